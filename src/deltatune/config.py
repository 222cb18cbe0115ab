"""Adapter configuration: the base dataclass, the task enum and JSON (de)serialisation.

Configs are written as ``adapter_config.json`` in exactly the layout HuggingFace PEFT uses, so a
folder saved by either library loads in the other. ``PeftType`` (the method names) is the registry's and
is re-exported here; ``PeftConfig.from_dict`` asks the registry which config class a ``peft_type`` has.
A config object is never mutated by the library: where deltatune needs a resolved variant (e.g.
``modules_to_save`` extended for a classification head), it works on a ``dataclasses.replace`` copy.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from .fileio import atomic_write_bytes
from .registry import PeftType, get_method

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """Task types; they choose the :class:`~deltatune.PeftModel` wrapper."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and the value."""


@dataclass
class PeftConfig:
    """Fields shared by every adapter method.

    Args:
        task_type: What the wrapped model does; picks the task wrapper. ``None`` = plain :class:`PeftModel`.
        base_model_name_or_path: The base model's id or path, recorded for the user's reference.
        revision: The base model's revision, recorded for reference.
        inference_mode: If True, adapter weights are created frozen (no gradients).
    """

    task_type: Optional[TaskType] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    auto_mapping: Optional[dict] = None

    # Subclasses set this; it is written as the ``peft_type`` JSON field.
    peft_type: ClassVar[PeftType]
    # Fields peft writes that deltatune accepts only at these default values (``{name: default}``).
    # They are written back unchanged so peft reads deltatune's files without complaint.
    compat_fields: ClassVar[dict] = {}

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ConfigError(
                    f"task_type={self.task_type!r} is not one of {[t.value for t in TaskType]}"
                ) from None
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for invalid values. Subclasses extend this."""

    # ----------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict, with peft's field names (sorted as peft writes them)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = value
        out.update({k: _copy_default(v) for k, v in self.compat_fields.items()})
        out["peft_type"] = self.peft_type.value
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` atomically."""
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), self.to_json_string().encode())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build a config from a peft-style dict.

        Keys this class does not know (written by newer peft versions) are dropped with a warning;
        peft-only features set to a non-default value raise :class:`ConfigError`, since silently
        ignoring them would give different outputs than peft.
        """
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        if peft_type is not None and cls is not PeftConfig and peft_type != cls.peft_type.value:
            raise ConfigError(f"config has peft_type={peft_type!r}, expected {cls.peft_type.value!r}")
        if cls is PeftConfig:
            if peft_type is None:
                raise ConfigError("adapter config has no 'peft_type' field")
            return get_method(peft_type).config_cls.from_dict({**data, "peft_type": peft_type})

        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in cls.compat_fields:
                if value != cls.compat_fields[key] and value is not None:
                    raise ConfigError(
                        f"adapter config sets {key}={value!r}, a peft feature deltatune does not "
                        f"support; only the default {cls.compat_fields[key]!r} is accepted"
                    )
            elif key != "peft_version":
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown adapter_config.json keys {sorted(unknown)} "
                "(probably written by a newer peft version)",
                stacklevel=2,
            )
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "PeftConfig":
        """Read ``adapter_config.json`` from a folder (or the file itself)."""
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else str(path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} found at {path!s}")
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file} must hold a JSON object, got {type(data).__name__}")
        data.update(overrides)
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "PeftConfig":
        """A validated copy with some fields changed (the original is untouched)."""
        return dataclasses.replace(self, **changes)

    def for_load(self, is_trainable: bool) -> "PeftConfig":
        """This config itself if its ``inference_mode`` already says what a load with ``is_trainable`` does,
        else a copy that does (a config the caller passed is never changed)."""
        return self if self.inference_mode == (not is_trainable) else self.replace(inference_mode=not is_trainable)


def _copy_default(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


def check_number(name: str, value: Any, *, low: float, high: float | None = None,
                 low_inclusive: bool = False, integer: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a number in the given range."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # (every comparison with NaN is false)
        raise ConfigError(f"{name} must be finite, got {value!r}")
    in_range = (value >= low if low_inclusive else value > low) and (high is None or value < high)
    if not in_range:
        lo = f"{'>=' if low_inclusive else '>'} {low}"
        hi = f" and < {high}" if high is not None else ""
        raise ConfigError(f"{name} must be {lo}{hi}, got {value!r}")


__all__ = ["PeftConfig", "PeftType", "TaskType", "ConfigError", "CONFIG_NAME", "check_number"]
