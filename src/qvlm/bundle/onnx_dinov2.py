"""ONNX export of a transformers Dinov2Model (possibly inside a bigger model) -> Dinov2Model folder.

The legacy (TorchScript) ONNX exporter keeps parameter names for most initialisers but not all:
- Linear weights become anonymous `onnx::MatMul_N` tensors, stored transposed ([in, out]); the consuming
  node's name (`/backbone/encoder/layer.0/mlp/fc1/MatMul`) still tells which module they belong to.
- The position embeddings are split into two anonymous tensors: the CLS position ([1, 1, D], fed to a
  Concat) and the patch grid ([1, N, D], fed to the Reshape before the bicubic Resize).
- Identical initialisers (e.g. all-zero biases) are stored once and re-exposed through Identity nodes.
- `mask_token` is unused at inference and therefore absent; it is zeros here (unused in our forward).
Everything else (sizes, eps, heads) is read from the graph so the conversion is exact, not assumed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qvlm.bundle import BundleError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PREFIX = "backbone."
LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"  # the backbone's last_hidden_state inside the graph


def convert_onnx(onnx_path: Path, out: Path, prefix: str = PREFIX) -> None:
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    state, config = extract_dinov2(graph, prefix)
    save_dinov2(state, config, out)


def extract_dinov2(graph, prefix: str = PREFIX) -> tuple[dict[str, np.ndarray], dict]:
    """Return (Dinov2Model state dict as numpy arrays, Dinov2Config kwargs) read from an ONNX graph."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # deduplicated initialisers come back through Identity nodes
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    state = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
    scope = "/" + prefix.rstrip(".").replace(".", "/") + "/"
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith(scope) and node.input[1] in values:
            module = node.name[len(scope):].rsplit("/", 1)[0].replace("/", ".")
            state.setdefault(module + ".weight", values[node.input[1]].T.copy())
    state = {_legacy_name(k): v for k, v in state.items()}
    state.update(_position_embeddings(graph, values, scope))
    hidden = state["embeddings.cls_token"].shape[-1]
    state.setdefault("embeddings.mask_token", np.zeros((1, hidden), dtype=np.float32))
    return state, _config(graph, state, scope)


# transformers >= 5 names the attention projections like other models; checkpoints on the hub (and so
# every transformers version's loader) use the original names, so the converted folder uses those.
_NEW_TO_HUB = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
               ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}


def _legacy_name(key: str) -> str:
    for new, old in _NEW_TO_HUB.items():
        key = key.replace(new, old)
    return key


def _position_embeddings(graph, values: dict, scope: str) -> dict[str, np.ndarray]:
    """Join the CLS position (Concat input) and the patch-grid positions (Reshape input)."""
    emb = scope + "embeddings/"
    cls_pos = grid = None
    for node in graph.node:
        if not node.name.startswith(emb) or "/patch_embeddings/" in node.name:
            continue
        for name in node.input:
            arr = values.get(name)
            if arr is None or arr.ndim != 3 or name.startswith(scope[1:].replace("/", ".")):
                continue
            if node.op_type == "Concat" and arr.shape[1] == 1:
                cls_pos = arr
            elif node.op_type == "Reshape" and arr.shape[1] > 1:
                grid = arr
    if cls_pos is None or grid is None:
        raise BundleError("could not find the two position-embedding tensors in the ONNX graph")
    return {"embeddings.position_embeddings": np.concatenate([cls_pos, grid], axis=1)}


def _const(graph, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def _layer_norm_eps(graph, norm_scope: str) -> float:
    """LayerNorm is exported as ...ReduceMean_1 -> Add(eps) -> Sqrt: read eps off that Add."""
    for node in graph.node:
        if node.op_type == "LayerNormalization" and node.name.startswith(norm_scope):  # opset >= 17
            return next((float(str(np.float32(a.f))) for a in node.attribute if a.name == "epsilon"), 1e-5)
        if node.op_type == "Add" and node.name == norm_scope + "Add":
            for name in node.input:
                c = _const(graph, name)
                if c is not None and c.size == 1:
                    return float(str(np.float32(c.item())))  # 1e-06, not 9.9999999747e-07
    raise BundleError(f"could not read the LayerNorm epsilon at {norm_scope} in the ONNX graph")


def _num_heads(graph, attn_scope: str, hidden: int) -> int:
    """The query reshape is to [B, T, heads, head_dim]: the Concat building that shape holds both."""
    for node in graph.node:
        if node.op_type == "Concat" and node.name.startswith(attn_scope) and len(node.input) == 4:
            dims = [_const(graph, n) for n in node.input[2:]]
            if all(d is not None and d.size == 1 for d in dims):
                heads, head_dim = (int(d.reshape(())) for d in dims)
                if heads == -1 and head_dim > 0:  # newer transformers reshape to [B, T, -1, head_dim]
                    heads = hidden // head_dim
                if heads * head_dim == hidden:
                    return heads
    raise BundleError(f"could not read the number of attention heads at {attn_scope} in the ONNX graph")


def _config(graph, state: dict[str, np.ndarray], scope: str) -> dict:
    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": _num_heads(graph, f"{scope}encoder/layer.0/attention/", hidden),
        "mlp_ratio": state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        "patch_size": patch,
        "image_size": grid * patch,
        "num_channels": state["embeddings.patch_embeddings.projection.weight"].shape[1],
        "layer_norm_eps": _layer_norm_eps(graph, f"{scope}encoder/layer.0/norm1/"),
        "hidden_act": "gelu",  # exported as x * (1 + erf(x / sqrt 2)) / 2: exact GELU
        "qkv_bias": "encoder.layer.0.attention.attention.query.bias" in state,
        "use_swiglu_ffn": False,
    }


def save_dinov2(state: dict[str, np.ndarray], config: dict, out: Path) -> None:
    """Write the weights under the names of the hub's facebook/dinov2-* checkpoints.

    Those names are what every transformers version loads (newer ones rename attention modules on load),
    so the folder does not depend on the transformers version that converted it.
    """
    from safetensors.numpy import save_file
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    Dinov2Config(architectures=["Dinov2Model"], **config).save_pretrained(out)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(state.items())},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    _, info = Dinov2Model.from_pretrained(out, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise BundleError(f"ONNX -> Dinov2Model conversion left {bad}; report this to the qvlm maintainers")
    # The preprocessing DINOv2 was trained with (facebook/dinov2-small's processor).
    BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
                      crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                      do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                      do_convert_rgb=True).save_pretrained(out)


def onnx_last_hidden_state(onnx_path: Path, pixel_values: np.ndarray,
                           tensor: str = LAST_HIDDEN) -> np.ndarray:
    """Run the ONNX backbone with onnxruntime and return its last_hidden_state.

    The file's only output is the saliency head's; the backbone's final LayerNorm output is an
    intermediate value. The subgraph from the image to that value is cut out (which also drops the
    head), and the image's height and width are made symbolic: the traced graph computes the
    position-embedding resize from the input shape, so other sizes (the offline preset's 112 px) run too.
    """
    import onnxruntime as ort

    sub = _subgraph(onnx_path, tensor)
    input_name = sub.graph.input[0].name
    for axis, dim in enumerate(sub.graph.input[0].type.tensor_type.shape.dim):
        if axis != 1:  # keep the channel count, free batch, height and width
            dim.dim_param = ("batch", "", "height", "width")[axis]
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    (result,) = session.run([tensor], {input_name: pixel_values.astype(np.float32)})
    return result


def _subgraph(onnx_path: Path, tensor: str):
    """The part of the graph that computes `tensor` (onnx.utils.Extractor needs shapes we lack)."""
    import onnx

    model = onnx.load(str(onnx_path))
    needed, kept = {tensor}, []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    graph = onnx.helper.make_graph(
        kept[::-1], "backbone", list(model.graph.input), [onnx.helper.make_empty_tensor_value_info(tensor)],
        initializer=[t for t in model.graph.initializer if t.name in needed])
    sub = onnx.helper.make_model(graph, opset_imports=model.opset_import)
    sub.ir_version = model.ir_version
    return sub
