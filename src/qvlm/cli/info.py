"""`qvlm info`: parameters per part (total / trainable), without downloading anything.

The model is built on the meta device from the architecture configs of the preset's backbones (shipped in
qvlm/configs/known_backbones.json for the presets' own models), so no weights are read or allocated.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources

from qvlm.config import PRESETS, ConfigError, QVLMConfig, get_preset


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="parameter counts per part of a preset (no download)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", help=f"{' | '.join(PRESETS)} (default: paper)")
    p.add_argument("--config", help="a config file (JSON/YAML) instead of a preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set lm.lora_r=16 (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def with_known_architectures(config: QVLMConfig) -> QVLMConfig:
    """Replace pretrained backbone references by their architecture configs (random/meta init)."""
    known = json.loads(resources.files("qvlm.configs").joinpath("known_backbones.json").read_text())
    config = QVLMConfig.from_dict(config.to_dict())
    for part in (config.vision, config.qformer, config.lm):
        if part.random_init is None:
            if part.name not in known:
                raise ConfigError(f"no architecture on file for {part.name!r}; `qvlm info` knows: "
                                  f"{', '.join(known)} (or set random_init)")
            part.random_init = dict(known[part.name])
    return config


def parameter_counts(config: QVLMConfig) -> dict[str, dict[str, int]]:
    """{part: {"total": n, "trainable": n}} for vision, qformer, adapter, lm (base) and lora."""
    from qvlm.models.vlm import QVLM

    model = QVLM.build(with_known_architectures(config), stage=2, device="meta")
    lm_params = list(model.lm.named_parameters())

    def count(params) -> dict[str, int]:
        params = list(params)
        return {"total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad)}

    return {
        "vision": count(model.vision.parameters()),
        "qformer": count(model.qformer.parameters()),
        "adapter": count(model.adapter.parameters()),
        "lm": count(p for n, p in lm_params if "lora_" not in n),
        "lora": count(p for n, p in lm_params if "lora_" in n),
    }


def run(args) -> int:
    config = QVLMConfig.load(args.config) if args.config else get_preset(args.preset)
    counts = parameter_counts(config.override(args.overrides))
    counts["all"] = {k: sum(c[k] for c in counts.values()) for k in ("total", "trainable")}
    if args.json:
        print(json.dumps(counts, indent=2))
        return 0
    print(f"{'part':<10}{'total':>15}{'trainable':>15}")
    for part, c in counts.items():
        print(f"{part:<10}{c['total']:>15,}{c['trainable']:>15,}")
    return 0
