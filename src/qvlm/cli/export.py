"""`qvlm export` and `qvlm push`: a run's model as a standalone folder, locally or on the Hugging Face Hub.

The folder is what `save_pretrained` writes (docs/inference.md#model-folders), with a model card holding
the run's measured metrics. Folders of the earlier format (with qvlm.json) are rewritten in this one.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from qvlm.errors import QVLMError

MERGED_FOLDER = "merged_lm"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's model as a standalone transformers / PEFT folder",
        description="Write RUN's model to DIR: config.json (model_type qvlm), safetensors weights, the LoRA as "
        "a PEFT adapter (lora/), the processor, generation_config.json and a model card with the run's "
        "metrics. Loads with `import qvlm` and the transformers Auto classes. Also converts a model folder of "
        "the earlier format.")
    p.add_argument("run", help="run folder (or its model/ folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create (must not exist)")
    add_export_args(p)
    p.set_defaults(func=run_export)

    p = subparsers.add_parser(
        "push", help="upload a run's model to the Hugging Face Hub",
        description="Export RUN's model (as `qvlm export`) and upload it to the hub repo ID (created if "
        "needed). Needs a hub token: `hf auth login` or HF_TOKEN.")
    p.add_argument("run", help="run folder (or its model/ folder)")
    p.add_argument("--repo", required=True, metavar="ID", help="hub repo id, e.g. you/qvlm-shapes")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    add_export_args(p)
    p.set_defaults(func=run_push)


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--merge-lora", action="store_true",
                   help=f"also write {MERGED_FOLDER}/: the LM with the LoRA folded in, a plain causal-LM "
                   "folder that AutoModelForCausalLM loads alone (text only)")
    p.add_argument("--full", action="store_true",
                   help="embed the frozen vision encoder and LM (vision/, lm/) instead of naming them")


def export(run: str | Path, out: Path, merge_lora: bool = False, full: bool = False) -> Path:
    """Write `run`'s model to `out`; returns `out`."""
    from qvlm.models.vlm import QVLM, model_folder

    folder = model_folder(Path(run))
    model = QVLM.from_pretrained(folder)
    if merge_lora and model.stage != 2:
        raise QVLMError(f"{run} is a stage-1 model: it has no LM, so no LoRA to merge; drop --merge-lora")
    model.save_pretrained(out, export_full=full, run_dir=folder.parent)
    if merge_lora:
        model.merged_lm().save_pretrained(out / MERGED_FOLDER)
        model.tokenizer.save_pretrained(out / MERGED_FOLDER)
    return out


def run_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise QVLMError(f"--out {out} already exists; choose a new folder")
    export(args.run, out, args.merge_lora, args.full)
    print(f"exported to {out}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    # HfHubHTTPError's bases: the HTTP client's HTTPError (which connection failures subclass) and OSError
    # (which offline mode's error subclasses).
    network_errors = HfHubHTTPError.__bases__
    with tempfile.TemporaryDirectory(prefix="qvlm-push-") as tmp:
        folder = export(args.run, Path(tmp) / "model", args.merge_lora, args.full)
        api = HfApi()
        try:
            url = api.create_repo(args.repo, private=args.private, exist_ok=True)
            api.upload_folder(folder_path=folder, repo_id=args.repo, commit_message="Upload qvlm model")
        except network_errors as e:
            raise QVLMError(f"could not push to the hub repo {args.repo}: {str(e).splitlines()[0]}. Check the "
                            "network and your token (`hf auth login` or HF_TOKEN); `qvlm export "
                            f"{args.run} --out DIR` writes the same folder locally") from e
    print(f"pushed to {url}")
    return 0
