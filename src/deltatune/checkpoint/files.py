"""Adapter folders on disk and on the Hub: write ``adapter_model.safetensors`` + ``adapter_config.json``
atomically, read them back (safetensors, or a ``.bin`` loaded with ``weights_only``), resolve a Hub id."""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..config import CONFIG_NAME, ConfigError, PeftConfig
from ..fileio import atomic_write, atomic_write_bytes, staged_folder
from .convert import convert_to_plain_lora
from .errors import CheckpointError
from .keys import rename_keys, saved_tensors, state_dict_for_save
from .sharded import any_sharded, wait_for_writer, writes_files

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

#: Keyword arguments of ``from_pretrained``/``load_adapter`` passed on to the Hub download.
HUB_KWARGS = {"token", "cache_dir", "force_download", "local_files_only", "proxies", "etag_timeout", "endpoint",
              "user_agent", "max_workers"}


def save_adapter(model: nn.Module, adapter_name: str, config, directory: str, initial_dir: Optional[str] = None,
                 state_dict: Optional[dict[str, Tensor]] = None) -> None:
    """Write one adapter of ``model`` (a PeftModel) and its ``config`` into ``directory``.

    Args:
        initial_dir: The folder a PiSSA/OLoRA adapter was saved to right after initialisation; the adapter
            is then written as plain LoRA for the original base weights (:func:`convert_to_plain_lora`).
        state_dict: Values to save instead of the live tensors, keyed as ``model.state_dict()`` names them
            (peft's ``save_pretrained(dir, state_dict=...)``; e.g. the full state dict of an FSDP2 model,
            gathered on rank 0, which then saves alone).

    On a sharded model without ``state_dict`` every rank must call this: the shards are gathered, rank 0
    writes, and every rank returns once the folder is complete.
    """
    tensors, config, gathered = _prepared(model, adapter_name, config, initial_dir, state_dict)
    if not gathered or writes_files():
        save_adapter_folder(directory, tensors, config)
    if gathered:
        wait_for_writer()


def save_adapters(model: nn.Module, directory: str, adapters, base_name: Optional[str] = None,
                  state_dict: Optional[dict[str, Tensor]] = None) -> None:
    """Write several adapters of ``model`` into ``directory`` in one atomic step, as peft lays them out:
    ``default`` at the root, the others in sub-folders named after them, and a model card.

    Args:
        adapters: ``(name, config, initial_dir)`` per adapter; ``config`` as it is to be saved,
            ``initial_dir`` as in :func:`save_adapter` (or None).
        base_name: The base model's name for the model card.
        state_dict: As in :func:`save_adapter`.

    A process killed at any moment leaves the folder as the previous save left it or as this one writes
    it, never one adapter new and another old (:func:`deltatune.fileio.staged_folder`); a failed call
    leaves it as it was. Sharded models: as :func:`save_adapter`.
    """
    prepared = [(name, *_prepared(model, name, config, initial, state_dict)) for name, config, initial in adapters]
    gathered = any(p[3] for p in prepared)
    if not gathered or writes_files():
        os.makedirs(directory, exist_ok=True)
        with staged_folder(directory) as staged:
            for name, tensors, config, _ in prepared:
                _write_pair(staged if name == "default" else os.path.join(staged, name), tensors, config)
            write_model_card(staged, base_name, [config for _, _, config, _ in prepared])
    if gathered:
        wait_for_writer()


def _prepared(model: nn.Module, adapter_name: str, config, initial_dir: Optional[str], state_dict):
    """``(tensors, config, gathered)`` of one adapter as it is to be written (``gathered``: from shards)."""
    bias = getattr(config, "bias", "none")
    gathered = state_dict is None and any_sharded(saved_tensors(model, adapter_name, bias).values())
    tensors = state_dict_for_save(model, adapter_name, bias, state_dict)
    if initial_dir is not None:
        tensors, config = convert_to_plain_lora(tensors, read_adapter_weights(initial_dir), config)
    return tensors, config, gathered


def _write_pair(folder: str, tensors: dict[str, Tensor], config) -> None:
    """The two files of one adapter, each renamed into place: in a staging folder a file may still be a
    hard link to the old folder's file, which must be replaced, never written through."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, SAFETENSORS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config.save_pretrained(folder)


def save_adapter_folder(directory: str, tensors: dict[str, Tensor], config) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory`` as one atomic
    step (:func:`deltatune.fileio.staged_folder`): the folder holds the old pair or the new one, never one
    file of each, whenever the process dies. Other entries of ``directory`` are kept."""
    os.makedirs(directory, exist_ok=True)  # (as before: a failed first save leaves the folder, empty)
    with staged_folder(directory, replaced=(SAFETENSORS_NAME, CONFIG_NAME)) as staged:
        _write_pair(staged, tensors, config)


class AdapterFiles(NamedTuple):
    """What :func:`read_adapter` read: the local folder, the config and the (renamed) weights."""

    directory: str
    config: object
    weights: dict


def read_adapter(model_id: str, subfolder: Optional[str] = None, revision: Optional[str] = None,
                 key_mapping: Optional[dict] = None, config=None, torch_device=None, **hub_kwargs) -> AdapterFiles:
    """Read an adapter folder (local or a Hub id) before anything is changed: its config (unless ``config``
    is given), its weights with ``key_mapping`` applied, on ``torch_device`` (default: the CPU; peft's
    argument: where the file's tensors are put before they are copied into the model)."""
    directory = resolve_adapter_dir(model_id, subfolder, revision, **hub_kwargs)
    config = config or _read_config(directory)
    weights = rename_keys(read_adapter_weights(directory), key_mapping)
    _check_numbers(config, weights, directory)
    if torch_device is not None:
        weights = {k: v.to(torch_device) for k, v in weights.items()}
    return AdapterFiles(directory, config, weights)


def _read_config(directory: str):
    """The folder's config; a file whose fields break the config's own checks (say ``"rank_pattern":
    null``) is a :class:`ConfigError` naming the file, like every other bad field."""
    try:
        return PeftConfig.from_pretrained(directory)
    except (ValueError, TypeError, OSError):  # (they say what is wrong already)
        raise
    except Exception as exc:
        raise ConfigError(f"{os.path.join(directory, CONFIG_NAME)} is not a valid adapter config "
                          f"({type(exc).__name__}: {exc})") from exc


def _check_numbers(config, weights: dict[str, Tensor], directory: str) -> None:
    """Refuse a LoRA config with a non-finite ``lora_alpha`` (JSON ``NaN``/``Infinity``; the config's own
    ``> 0`` check lets NaN through) or an ``r`` above the rank of every ``lora_A`` tensor of the file (e.g. a
    hand-edited ``"r": 2147483648``) before the model is touched: building the layers would first try to
    allocate tensors of that rank. (With a ``rank_pattern`` ranks differ per module; the load checks each shape.)"""
    if getattr(config.peft_type, "value", None) != "LORA":
        return
    alphas = [config.lora_alpha, *dict(config.alpha_pattern or {}).values()]
    if not all(isinstance(a, (int, float)) and math.isfinite(a) for a in alphas):
        raise ConfigError(f"{os.path.join(directory, CONFIG_NAME)}: lora_alpha/alpha_pattern must be finite "
                          f"numbers, got {alphas[:4]}; nothing was loaded")
    r = getattr(config, "r", None)
    if not isinstance(r, int) or config.rank_pattern:
        return
    ranks = sorted({int(t.shape[0]) for k, t in weights.items() if k.endswith(".lora_A.weight") and t.dim()})
    # Only a rank above the file's is refused here (that is what would allocate too much); a smaller one
    # fails the load's per-tensor shape check, which undoes the injection.
    if ranks and r > ranks[-1]:
        raise CheckpointError(f"{os.path.join(directory, CONFIG_NAME)} says r={r}, but the lora_A tensors of "
                              f"{SAFETENSORS_NAME} have shape ({ranks[-1]}, ...) at most; nothing was loaded")


MODEL_CARD_NAME = "README.md"


def write_model_card(directory: str, base_name: Optional[str], configs) -> None:
    """A ``README.md`` model card for an adapter folder, as peft writes one (so a folder pushed to the Hub
    has one): Hub metadata naming the base model and ``library_name: peft`` (the files are peft's format).
    An existing card is left as it is (it may be the user's)."""
    path = os.path.join(directory, MODEL_CARD_NAME)
    if os.path.exists(path):
        return
    kinds = sorted({c.peft_type.value.lower() for c in configs})
    tags = ([f"base_model:adapter:{base_name}"] if base_name else []) + kinds + ["deltatune"]
    header = ["---"] + ([f"base_model: {base_name}"] if base_name else []) + ["library_name: peft", "tags:"]
    header += [f"- {tag}" for tag in tags] + ["---", ""]
    body = [f"# {', '.join(kinds)} adapter{f' for {base_name}' if base_name else ''}", "",
            "Saved with deltatune in the PEFT format: it loads with `peft.PeftModel.from_pretrained(base, path)` "
            "or `deltatune.PeftModel.from_pretrained(base, path)`.", ""]
    atomic_write_bytes(path, "\n".join(header + body).encode("utf-8"))


def read_adapter_weights(directory: str, allow_pickle: bool = True) -> dict[str, Tensor]:
    """Read the weights of an adapter folder: safetensors, else a ``.bin`` via ``weights_only`` loading."""
    st_path = os.path.join(directory, SAFETENSORS_NAME)
    if os.path.isfile(st_path):
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            # The bytes, then load(): safetensors 0.8's load_file/safe_open keep ~60 bytes per tensor
            # name alive on every call (a server loading adapters for days grew ~0.75 KB per load;
            # tests/test_long_runs.py). An adapter file is small; its bytes are freed on return.
            with open(st_path, "rb") as fh:
                return load(fh.read())
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


__all__ = ["HUB_KWARGS", "PICKLE_NAME", "SAFETENSORS_NAME", "read_adapter_weights", "resolve_adapter_dir",
           "save_adapter", "save_adapter_folder", "save_adapters"]
