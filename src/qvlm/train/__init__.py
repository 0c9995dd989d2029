"""Training: both stages in one plain loop (`trainer.train`), checkpoints, optimizer groups."""
