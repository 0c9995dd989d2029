"""Data: readers, robust decoding, feature cache, datasets, collators."""
