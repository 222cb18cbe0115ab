"""What the server knows about each adapter before it touches the model: where it lives, whether it may
share a base with others, and its classification labels."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .errors import ServeError
from .paths import sibling_file

#: Prefix of every key in a peft checkpoint.
_PREFIX = "base_model.model."
#: Methods whose adapters change the input sequence (virtual tokens, prefixes) rather than the weights'
#: outputs: rows of one batch would no longer line up, so the server does not take them.
_PROMPT_METHODS = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
#: Head module names a classification adapter trains (``modules_to_save``).
_HEADS = ("classifier", "score")


@dataclass
class AdapterSpec:
    """One adapter the server can serve (loaded now or reloadable from ``path``).

    Attributes:
        name: The served name (the request's ``model`` field).
        path: Its folder (resolved).
        pinned: Given on the command line: never evicted to make room for others.
        num_labels: Rows of its classification head (0: it has none).
        labels: Class names, one per head row.
    """

    name: str
    path: str
    pinned: bool = False
    num_labels: int = 0
    labels: list[str] = field(default_factory=list)


def _module_of(key: str) -> str:
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def _in_saved_module(key: str, modules_to_save: Iterable[str]) -> bool:
    parts = key.split(".")
    return any(m in parts[:-1] for m in modules_to_save)


def read_spec(name: str, path: str, base_params: set[str], pinned: bool = False,
              root: Optional[str] = None) -> AdapterSpec:
    """Read adapter folder ``path`` and check it can join the base without touching shared weights.

    Args:
        name: Served name.
        path: The adapter folder (already confined by the caller where that applies).
        base_params: Parameter names of the plain base model.
        pinned: Given on the command line.
        root: The adapter root, if any: a run's ``metrics.json`` (class names) is read only inside it.

    Raises:
        ServeError: 422 for an unreadable folder, a prompt-learning adapter, trained base biases or
            tensors that overwrite base weights other adapters share.
    """
    from ..checkpoint import CheckpointError
    from ..checkpoint.files import read_adapter_weights
    from ..config import PeftConfig

    try:
        config = PeftConfig.from_pretrained(path)
        weights = read_adapter_weights(path, allow_pickle=True)
    except (CheckpointError, ValueError, OSError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ServeError(422, f"adapter {name!r} cannot be read: {first}") from None
    kind = getattr(config.peft_type, "value", str(config.peft_type))
    if kind in _PROMPT_METHODS:
        raise ServeError(422, f"adapter {name!r} is a {kind} adapter; the server serves weight adapters "
                              "(LoRA, DoRA, IA3, AdaLoRA) only")
    if getattr(config, "bias", "none") != "none":
        raise ServeError(422, f"adapter {name!r} trains base biases (bias={config.bias!r}), which every "
                              "adapter on this base shares; retrain it with bias='none'")
    saved = list(getattr(config, "modules_to_save", None) or [])
    shared = [k for k in weights if _module_of(k) in base_params and not _in_saved_module(_module_of(k), saved)]
    if shared:
        raise ServeError(422, f"adapter {name!r} would overwrite base weights that other adapters share "
                              f"(e.g. {shared[0]!r}); the server refuses it")
    heads = [v for k, v in weights.items() if k.endswith(".weight") and any(f"{h}." in _module_of(k) for h in _HEADS)
             and v.dim() == 2]
    num_labels = int(heads[-1].shape[0]) if heads else 0
    return AdapterSpec(name, path, pinned, num_labels, _labels(path, num_labels, root))


def _labels(path: str, num_labels: int, root: Optional[str]) -> list[str]:
    """Class names: a ``deltatune train`` run keeps them in ``metrics.json`` beside ``adapter/``."""
    if not num_labels:
        return []
    metrics = sibling_file(path, "metrics.json", root)
    if metrics is not None:
        try:
            with open(metrics) as fh:
                names = json.load(fh).get("dataset", {}).get("labels")
            if isinstance(names, list) and len(names) == num_labels:
                return [str(n) for n in names]
        except (OSError, ValueError, AttributeError):
            pass  # no usable names: fall back to numbered labels
    return [f"LABEL_{i}" for i in range(num_labels)]
