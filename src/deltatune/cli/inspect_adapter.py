"""``deltatune inspect``: what an adapter folder holds, and whether peft can read it."""

from __future__ import annotations

import json
import os
import re

from safetensors import safe_open

from ..checkpoint import SAFETENSORS_NAME, adapted_module_names
from ..config import CONFIG_NAME, PeftConfig
from ..methods.prompt_tuning.config import PromptTuningConfig
from ..registry import adapter_key_suffixes, prompt_checkpoint_keys, rank_key_suffixes, shared_tensor_names
from .options import UsageError
from .report import human_bytes

#: The fields shown for a prompt-learning adapter (prompt tuning, prefix tuning, p-tuning), when set.
PROMPT_FIELDS = ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                 "num_layers", "prompt_tuning_init", "encoder_hidden_size", "prefix_projection",
                 "encoder_reparameterization_type")


def peft_key_pattern() -> re.Pattern:
    """The key shapes peft writes for the registered methods: a prompt method's root key, a method's shared
    tensor under ``base_model.`` (VeRA's ``base_model.vera_A``), or a module path under ``base_model.`` ending
    in an adapter tensor's suffix, ``bias`` or ``weight`` (saved copies)."""
    roots = "|".join([re.escape(k) for k in prompt_checkpoint_keys()]
                     + [re.escape("base_model." + n) for n in shared_tensor_names()])
    ends = "|".join(re.escape(s) for s in adapter_key_suffixes() + ["bias", "weight"])
    return re.compile(rf"^({roots + '|' if roots else ''}base_model\.(model\.)?.+\.({ends}))$")


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
    try:
        with safe_open(weights, "pt") as fh:
            shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    except Exception as exc:  # truncated or not safetensors at all
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{weights} is not a readable safetensors file ({detail})") from None
    params = sum(_numel(s) for s in shapes.values())
    modules = adapted_module_names(shapes)
    rank_suffixes = tuple(f".{s}" for s in rank_key_suffixes())
    ranks = sorted({s[0] for k, s in shapes.items() if k.endswith(rank_suffixes)})
    peft_key = peft_key_pattern()
    bad_keys = [k for k in shapes if not peft_key.match(k)]
    known = set(config.to_dict()) | {"peft_version"}
    unknown_fields = sorted(set(raw) - known)
    compatible = not bad_keys and not unknown_fields
    lines = [
        f"adapter:      {folder}",
        f"method:       {config.peft_type.value}" + (f" (task {config.task_type.value})" if config.task_type else ""),
    ]
    if isinstance(config, PromptTuningConfig):  # virtual tokens: no ranks, targets or adapted modules
        lines += [f"peft_type:    {config.peft_type.value}",
                  f"task_type:    {config.task_type.value if config.task_type else None}"]
        lines += [f"{name + ':':<13} {getattr(config, name)}" for name in PROMPT_FIELDS
                  if getattr(config, name, None) is not None]
    else:
        lines += [
            f"rank(s):      {ranks} (r={getattr(config, 'r', '-')}, alpha={getattr(config, 'lora_alpha', getattr(config, 'alpha', '-'))}"
            + (", rsLoRA" if getattr(config, "use_rslora", False) else "") + ")",
            f"targets:      {getattr(config, 'target_modules', None)!r} -> {len(modules)} adapted modules",
        ]
    lines += [
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
