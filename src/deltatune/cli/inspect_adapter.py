"""``deltatune inspect``: what an adapter folder holds, and whether peft can read it."""

from __future__ import annotations

import json
import os
import re

from safetensors import safe_open

from ..checkpoint import SAFETENSORS_NAME
from ..config import CONFIG_NAME, PeftConfig
from .report import human_bytes

# Key shapes peft writes for the methods deltatune supports.
_PEFT_KEY = re.compile(r"^(prompt_embeddings|base_model\.(model\.)?.+\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                       r"lora_embedding_B|lora_A|lora_B|lora_E|ia3_l|bias|weight|lora_magnitude_vector))$")


def adapter_folder(path: str) -> str:
    """A run folder's ``adapter/`` or the adapter folder itself."""
    for candidate in (os.path.join(path, "adapter"), path):
        if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
            return candidate
    raise FileNotFoundError(f"{path!r} holds no {CONFIG_NAME} (neither a run folder nor an adapter folder)")


def inspect_command(path: str) -> str:
    folder = adapter_folder(path)
    config = PeftConfig.from_pretrained(folder)
    raw = json.load(open(os.path.join(folder, CONFIG_NAME)))
    weights = os.path.join(folder, SAFETENSORS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no {SAFETENSORS_NAME} in {folder}")
    with safe_open(weights, "pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    params = sum(_numel(s) for s in shapes.values())
    modules = sorted({re.sub(r"\.(lora_\w+|ia3_l)(\.weight)?$", "", k) for k in shapes if ".lora_" in k or k.endswith(".ia3_l")})
    ranks = sorted({s[0] for k, s in shapes.items() if k.endswith(("lora_A.weight", "lora_embedding_A", ".lora_A"))})
    bad_keys = [k for k in shapes if not _PEFT_KEY.match(k)]
    known = set(config.to_dict()) | {"peft_version"}
    unknown_fields = sorted(set(raw) - known)
    compatible = not bad_keys and not unknown_fields
    lines = [
        f"adapter:      {folder}",
        f"method:       {config.peft_type.value}" + (f" (task {config.task_type.value})" if config.task_type else ""),
        f"rank(s):      {ranks} (r={getattr(config, 'r', '-')}, alpha={getattr(config, 'lora_alpha', '-')}"
        + (", rsLoRA" if getattr(config, "use_rslora", False) else "") + ")",
        f"targets:      {getattr(config, 'target_modules', None)!r} -> {len(modules)} adapted modules",
        f"saved whole:  {getattr(config, 'modules_to_save', None)}",
        f"parameters:   {params:,} in {len(shapes)} tensors",
        f"file size:    {human_bytes(os.path.getsize(weights))}",
        f"base model:   {config.base_model_name_or_path}",
        "peft format:  " + ("yes (HF PEFT key names and config fields)" if compatible else
                            f"no: unexpected keys {bad_keys[:3]} / fields {unknown_fields[:3]}"),
    ]
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
