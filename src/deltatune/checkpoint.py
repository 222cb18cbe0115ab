"""Saving and loading adapters in the HuggingFace PEFT format.

This is the one place where deltatune's module structure is mapped to PEFT's key names. A folder holds
``adapter_config.json`` and ``adapter_model.safetensors``; tensor keys are the module path (with the
adapter name left out) plus a suffix per tensor, e.g.::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight      (r, in)
    base_model.model.model.embed_tokens.lora_embedding_A               (r, num_embeddings)
    base_model.model.score.weight                                     (a modules_to_save copy)
    base_model.model.transformer.h.0.attn.c_attn.base_layer.bias       (bias="all"/"lora_only")
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .injection import adapter_layers, assign_parameters, iter_modules, saved_module_wrappers
from .modules_to_save import ModulesToSaveWrapper
from .registry import adapter_layer_types

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

#: HF key suffix of each adapter tensor role, per layer ``checkpoint_kind``.
HF_SUFFIXES = {
    "lora": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude_vector": "lora_magnitude_vector"},
    "ia3": {"ia3_l": "ia3_l"},
    "adalora": {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"},
    "lora_embedding": {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B",
                       "lora_magnitude_vector": "lora_magnitude_vector"},
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (corrupt file, wrong shapes, unknown keys)."""


# --------------------------------------------------------------------------- atomic file writes
def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic(path, write)


def _atomic(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- state dicts
def adapter_tensors(model: nn.Module, adapter_name: str, bias: str = "none",
                    peft_layout: bool = False, for_save: bool = False) -> dict[str, Tensor]:
    """The live tensors of one adapter under their HF keys (relative to ``model``).

    Covers the adapter layers' declared tensors, modules_to_save copies (parameters and buffers) and,
    per ``bias``, base biases. ``peft_layout`` adds the extra keys peft writes for ``bias="all"``
    (the biases inside modules_to_save wrappers), so saved files carry the same key set as peft's.
    """
    out: dict[str, Tensor] = {}
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            suffixes = HF_SUFFIXES[layer.checkpoint_kind]
            # A layer may save less than it trains (AdaLoRA keeps only its unpruned triplets).
            params = layer.saved_params(adapter_name) if for_save and hasattr(layer, "saved_params") \
                else layer.adapter_params(adapter_name)
            for role, tensor in params.items():
                out[f"{name}.{suffixes[role]}"] = tensor
        # As in peft, "lora_only" means the biases of every adapted layer, whichever adapter it holds.
        if bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            out[_bias_key(name, layer, adapter_name)] = layer.base_layer.bias
    prompts = getattr(model, "prompt_encoder", None)
    if isinstance(prompts, nn.ModuleDict) and adapter_name in prompts:
        out.update(prompts[adapter_name].adapter_params())  # root-level keys, as peft saves them
    for name, wrapper in saved_module_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{name}.{key}"] = tensor
    if bias == "all":
        out.update(_all_biases(model, adapter_name, peft_layout))
    return out


def _bias_key(name: str, layer: nn.Module, adapter_name: str) -> str:
    """A base bias is keyed as the adapter alone would see it: ``x.base_layer.bias`` if this adapter
    wraps the layer, ``x.bias`` if only other adapters do (so the file loads on its own, in peft too)."""
    return f"{name}.base_layer.bias" if adapter_name in layer.adapters else f"{name}.bias"


def _all_biases(module: nn.Module, adapter_name: str, peft_layout: bool, prefix: str = "") -> dict[str, Tensor]:
    """Every module's own ``bias`` parameter. A modules_to_save copy is saved whole already; peft
    additionally lists ``<name>.original_module.bias`` and ``<name>.modules_to_save.bias``."""
    out = {}
    if isinstance(module, adapter_layer_types()) and adapter_name not in module.adapters:
        return _all_biases(module.base_layer, adapter_name, peft_layout, prefix)
    if isinstance(module, ModulesToSaveWrapper):
        if peft_layout:
            out.update(_all_biases(module.original_module, adapter_name, False, prefix + "original_module."))
            if adapter_name in module.modules_to_save:
                copy = module.modules_to_save[adapter_name]
                out.update(_all_biases(copy, adapter_name, False, prefix + "modules_to_save."))
        return out
    if module._parameters.get("bias") is not None:
        out[prefix + "bias"] = module._parameters["bias"]
    for name, child in module.named_children():
        out.update(_all_biases(child, adapter_name, peft_layout, f"{prefix}{name}."))
    return out


ROOT = "base_model.model."


def _is_prompt_adapter(model: nn.Module, adapter_name: str) -> bool:
    prompts = getattr(model, "prompt_encoder", None)
    return isinstance(prompts, nn.ModuleDict) and adapter_name in prompts


def to_peft_keys(model: nn.Module, tensors: dict[str, Tensor], adapter_name: str) -> dict[str, Tensor]:
    """A PeftModel's keys as peft writes them: prompt-learning adapters have no tuner module between
    the PeftModel and the base model, so their module keys start ``base_model.`` (not ``base_model.model.``)."""
    if not _is_prompt_adapter(model, adapter_name):
        return tensors
    return {("base_model." + k[len(ROOT):] if k.startswith(ROOT) else k): v for k, v in tensors.items()}


def from_peft_keys(model: nn.Module, weights: dict[str, Tensor], adapter_name: str) -> dict[str, Tensor]:
    """Keys of a peft file (or state dict, with or without the ``base_model.model.`` prefix) as this
    PeftModel names its tensors; root keys such as ``prompt_embeddings`` name no module and stay."""
    prompt = _is_prompt_adapter(model, adapter_name)
    out = {}
    for key, value in weights.items():
        if "." not in key or key.startswith(ROOT):
            out[key] = value
        elif prompt and key.startswith("base_model."):
            out[ROOT + key[len("base_model."):]] = value
        else:
            out[ROOT + key] = value
    return out


def adapted_module_names(keys) -> list[str]:
    """The modules a state dict's adapter keys belong to (``x.lora_A.weight`` -> ``x``), in order; keys of
    other tensors (modules_to_save copies, biases, prompts) are left out. A ``base_model.model.`` prefix is
    dropped."""
    suffixes = sorted({f".{s}" for kind in HF_SUFFIXES.values() for s in kind.values()}, key=len, reverse=True)
    names: dict[str, None] = {}
    for key in keys:
        key = key[len(ROOT):] if key.startswith(ROOT) else key
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is not None:
            names[key[: -len(suffix)]] = None
    return list(names)


def rename_keys(weights: dict[str, Tensor], key_mapping: Optional[dict[str, str]]) -> dict[str, Tensor]:
    """peft's ``key_mapping``: regular-expression ``pattern -> replacement`` pairs applied to each file key
    without its ``base_model.model.`` prefix (the first pattern that matches renames it), e.g.
    ``{r"^language_model\\.blocks": "model.layers"}`` for a checkpoint of a model whose modules were renamed."""
    if not key_mapping:
        return weights
    rules = []
    for pattern, replacement in key_mapping.items():
        try:
            rules.append((re.compile(pattern), replacement))
        except re.error as exc:
            raise ValueError(f"key_mapping pattern {pattern!r} is not a regular expression: {exc}") from None
    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        prefix = ROOT if key.startswith(ROOT) else ""
        rest = key[len(prefix):]
        for rule, replacement in rules:
            rest, hits = rule.subn(replacement, rest)
            if hits:
                break
        if prefix + rest in out:
            raise CheckpointError(f"key_mapping renames two checkpoint keys to {prefix + rest!r}")
        out[prefix + rest] = value
    return out


def state_dict_for_save(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, Tensor]:
    """Detached, contiguous CPU copies of :func:`adapter_tensors` under peft's keys (what goes into the file)."""
    tensors = to_peft_keys(model, adapter_tensors(model, adapter_name, bias, peft_layout=True, for_save=True),
                           adapter_name)
    empty = [k for k, v in tensors.items() if v.is_meta]
    if empty:
        raise CheckpointError(f"adapter {adapter_name!r} has {len(empty)} tensor(s) without values (created with "
                              f"low_cpu_mem_usage=True and never loaded), e.g. {empty[:3]}")
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


class LoadResult(NamedTuple):
    """What :func:`load_into` did not load (the fields of peft's and torch's load results)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def load_into(model: nn.Module, state_dict: dict[str, Tensor], adapter_name: str, bias: str = "none",
              ignore_mismatched_sizes: bool = False) -> LoadResult:
    """Copy checkpoint tensors into adapter ``adapter_name`` of ``model``; all-or-nothing.

    Every key is resolved and every shape checked before the first tensor is copied, so a bad
    checkpoint raises :class:`CheckpointError` and leaves the model unchanged (``ignore_mismatched_sizes``:
    tensors of another shape are skipped with a warning instead). Keys naming other model parameters
    (e.g. a base embedding peft saved with ``save_embedding_layers``) are loaded as well. Tensors created
    empty on the ``meta`` device (``low_cpu_mem_usage``) are replaced by the loaded values.

    Returns:
        The adapter keys the checkpoint did not provide (missing keys); unexpected keys raise instead.
    """
    prompts = getattr(model, "prompt_encoder", None)
    if isinstance(prompts, nn.ModuleDict) and adapter_name in prompts and hasattr(prompts[adapter_name], "prepare_load"):
        prompts[adapter_name].prepare_load()  # e.g. P-tuning: the file holds final prompts, not encoder weights
    # Keys are compared in a canonical form without ``.base_layer``: a bias saved as
    # ``x.base_layer.bias`` (its layer had an adapter then) is ``x.bias`` on a plain layer now.
    wanted = {_unwrapped(k): v for k, v in adapter_tensors(model, adapter_name, bias, peft_layout=True).items()}
    others = {_unwrapped(n): p for n, p in model.named_parameters()}
    plan, skipped = [], []
    for key, tensor in state_dict.items():
        target = wanted.get(_unwrapped(key), others.get(_unwrapped(key)))
        if target is None:
            close = [k for k in wanted if k.rsplit(".", 2)[0] == key.rsplit(".", 2)[0]][:3]
            hint = f"; keys near it in the model: {close}" if close else ""
            raise CheckpointError(
                f"checkpoint key {key!r} matches nothing in the model (is this adapter for another "
                f"base model?){hint}"
            )
        if tuple(tensor.shape) != tuple(target.shape):
            if ignore_mismatched_sizes:
                skipped.append((key, f"{key}: {tuple(tensor.shape)} vs {tuple(target.shape)}"))
                continue
            raise CheckpointError(
                f"checkpoint key {key!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(target.shape)}; the model was left unchanged"
            )
        plan.append((target, tensor))
    provided = {_unwrapped(k) for k in state_dict} - {_unwrapped(k) for k, _ in skipped}
    empty = [k for k, t in wanted.items() if t.is_meta and k not in provided]
    if empty:  # created on meta (low_cpu_mem_usage) and not in the file: they would have no values
        raise CheckpointError(f"the checkpoint has no values for {len(empty)} tensor(s) of adapter {adapter_name!r} "
                              f"that were created empty (low_cpu_mem_usage), e.g. {empty[:3]}; nothing was loaded")
    with torch.no_grad():
        for target, tensor in plan:
            if not target.is_meta:
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    assign_parameters(model, [(t, v) for t, v in plan if t.is_meta])  # copy_ into meta does nothing
    if skipped:
        warnings.warn(f"ignore_mismatched_sizes: {len(skipped)} tensor(s) of another shape were not loaded: "
                      f"{[m for _, m in skipped[:5]]}", UserWarning, stacklevel=3)
    return LoadResult([k for k in wanted if k not in provided], [])


def _unwrapped(key: str) -> str:
    return key.replace(".base_layer.", ".")


def convert_to_plain_lora(tensors: dict[str, Tensor], initial: dict[str, Tensor], config):
    """A PiSSA/OLoRA adapter as a plain LoRA adapter for the *original* base weights.

    Training moved ``(A0, B0)`` to ``(A, B)`` on the residual base ``W - s B0 A0``, so the update on the
    original ``W`` is ``s (B A - B0 A0) = s [B, -B0] [A; A0]``: rank ``2r`` with the same scaling
    (alpha doubled, or times sqrt(2) with rsLoRA).
    """
    out = dict(tensors)
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        key_b = key[: -len("lora_A.weight")] + "lora_B.weight"
        if key not in initial or key_b not in initial:
            raise CheckpointError(f"the initial adapter has no {key!r}: is it the one saved right after initialisation?")
        out[key] = torch.cat([tensors[key], initial[key].to(tensors[key].dtype)], 0)
        out[key_b] = torch.cat([tensors[key_b], -initial[key_b].to(tensors[key_b].dtype)], 1)
    factor = 2 ** 0.5 if config.use_rslora else 2
    converted = config.replace(
        init_lora_weights=True, r=2 * config.r, lora_alpha=factor * config.lora_alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
    )
    return out, converted


# --------------------------------------------------------------------------- files
def save_adapter(model: nn.Module, adapter_name: str, config, directory: str, initial_dir: Optional[str] = None) -> None:
    """Write one adapter of ``model`` (a PeftModel) and its ``config`` into ``directory``.

    ``initial_dir``: the folder a PiSSA/OLoRA adapter was saved to right after initialisation; the adapter
    is then written as plain LoRA for the original base weights (:func:`convert_to_plain_lora`).
    """
    tensors = state_dict_for_save(model, adapter_name, getattr(config, "bias", "none"))
    if initial_dir is not None:
        tensors, config = convert_to_plain_lora(tensors, read_adapter_weights(initial_dir), config)
    save_adapter_folder(directory, tensors, config)


def save_adapter_folder(directory: str, tensors: dict[str, Tensor], config) -> None:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` into ``directory``, each atomically."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    _atomic(os.path.join(directory, SAFETENSORS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config.save_pretrained(directory)


def read_adapter_weights(directory: str, allow_pickle: bool = True) -> dict[str, Tensor]:
    """Read the weights of an adapter folder: safetensors, else a ``.bin`` via ``weights_only`` loading."""
    st_path = os.path.join(directory, SAFETENSORS_NAME)
    if os.path.isfile(st_path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st_path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{st_path} is truncated or corrupt and cannot be read: {exc}") from None
    bin_path = os.path.join(directory, PICKLE_NAME)
    if os.path.isfile(bin_path) and allow_pickle:
        try:
            # weights_only refuses arbitrary pickled objects: untrusted files cannot run code.
            data = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{bin_path} could not be loaded safely (weights_only=True): {exc}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{bin_path} does not hold a state dict")
        return data
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} (or {PICKLE_NAME}) in {directory}")


#: Keyword arguments of ``from_pretrained``/``load_adapter`` passed on to the Hub download.
HUB_KWARGS = {"token", "cache_dir", "force_download", "local_files_only", "proxies", "etag_timeout", "endpoint",
              "user_agent", "max_workers"}


def resolve_adapter_dir(path_or_id: str, subfolder: Optional[str] = None, revision: Optional[str] = None,
                        **hub_kwargs) -> str:
    """A local folder holding the adapter: ``path_or_id`` itself, or a Hub snapshot of it."""
    unknown = sorted(set(hub_kwargs) - HUB_KWARGS)
    if unknown:  # (for a local folder they would otherwise be dropped without a word)
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the Hub download takes {sorted(HUB_KWARGS)}")
    local = os.path.join(path_or_id, subfolder) if subfolder else str(path_or_id)
    if os.path.isdir(local):
        return local
    if os.path.exists(path_or_id) or str(path_or_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"adapter folder {local!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(
            str(path_or_id), revision=revision,
            allow_patterns=[f"{subfolder + '/' if subfolder else ''}adapter_*"], **hub_kwargs,
        )
    except Exception as exc:
        raise FileNotFoundError(
            f"{path_or_id!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path_or_id!r} on the Hub has no folder {subfolder!r}")
    return folder


def warn_missing(missing: list[str], adapter_name: str) -> None:
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        warnings.warn(f"adapter {adapter_name!r}: {len(missing)} tensors were not in the checkpoint and keep "
                      f"their initial values: {shown}", stacklevel=3)


__all__ = [
    "CheckpointError", "LoadResult", "adapted_module_names", "adapter_tensors", "state_dict_for_save", "load_into", "save_adapter_folder",
    "read_adapter_weights", "rename_keys", "resolve_adapter_dir", "atomic_write_bytes", "iter_modules",
]
