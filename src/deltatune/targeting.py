"""Pure functions deciding which module names a config targets.

Matching rules (the ones peft users know):

* a **list** entry matches a module whose name equals it or ends with ``"." + entry``;
* a **string** is a regular expression that must match the *whole* module name;
* ``"all-linear"`` matches every linear layer except the model's output head;
* ``layers_to_transform`` keeps only modules under ``<layers_pattern>.<index>.`` with a listed index.
"""

from __future__ import annotations

import difflib
import re
from typing import Callable, Iterable, Optional, Sequence, Union

Targets = Optional[Union[str, Sequence[str]]]

ALL_LINEAR = "all-linear"
DEFAULT_LAYER_CONTAINERS = ("layers", "h", "block", "blocks", "layer", "encoder.layer", "decoder.layers")
_REGEX_HINT = re.compile(r"[*?\[\]()|\\^$+{}]")


class TargetError(ValueError):
    """No module matched a config's targets; the message lists close matches."""


def matches_entry(name: str, entry: str) -> bool:
    """List-entry rule: exact name, or a ``.``-boundary suffix of it."""
    return name == entry or name.endswith("." + entry)


def matches(name: str, targets: Targets) -> bool:
    """Whether ``name`` matches ``targets`` (list = suffix rule, str = full regex). ``None`` never matches."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(matches_entry(name, t) for t in targets)


def pattern_value(patterns: dict, name: str, default):
    """Value of the first ``{regex: value}`` key matching a trailing part of ``name`` (else default).

    A key ``k`` matches when ``(.*\\.)?k`` matches the whole name, so ``"q_proj"`` and
    ``"layers.0.self_attn.q_proj"`` both select ``model.layers.0.self_attn.q_proj``.
    """
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


def layer_index(name: str, layers_pattern: Targets = None) -> Optional[int]:
    """The index ``i`` in ``...<container>.<i>...`` of a module name, or None if it has none."""
    containers = (
        DEFAULT_LAYER_CONTAINERS if not layers_pattern
        else [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    )
    for container in containers:
        m = re.match(rf"(?:.*\.)?{re.escape(container)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def is_target(name: str, module, config, *, is_linear: Callable, output_heads: Iterable[str] = ()) -> bool:
    """Whether the module ``name`` is adapted under ``config`` (a LoRA-style config)."""
    targets = config.target_modules
    if targets == ALL_LINEAR:
        if not is_linear(module) or name in output_heads:
            return False
    elif not matches(name, targets):
        return False
    if matches(name, config.exclude_modules):
        return False
    wanted = config.layers_to_transform
    if wanted is not None:
        wanted = [wanted] if isinstance(wanted, int) else list(wanted)
        if layer_index(name, config.layers_pattern) not in wanted:
            return False
    return True


def glob_to_regex(entry: str) -> str:
    """The full-match regex for a glob-like entry such as ``layers.*.q_proj``."""
    parts = []
    for ch in entry:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return "(.*\\.)?" + "".join(parts)


def no_match_message(targets: Targets, names: Sequence[str], what: str = "target_modules") -> str:
    """A message saying nothing matched, with the closest module names and a regex hint."""
    lines = [f"{what}={targets!r} matched no module of the model."]
    entries = [targets] if isinstance(targets, str) else list(targets or [])
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    for entry in entries:
        pool = suffixes if "." not in entry else [n for n in names if n]
        close = difflib.get_close_matches(entry, pool, n=5, cutoff=0.5)
        if close:
            lines.append(f"  closest names to {entry!r}: {close}")
        if not isinstance(targets, str) and _REGEX_HINT.search(entry):
            lines.append(
                f"  note: list entries match module-name suffixes literally, so {entry!r} is not a "
                f"pattern. To match by pattern pass ONE string, a regex matched against the full "
                f"name, e.g. target_modules={glob_to_regex(entry)!r}"
            )
    if len(lines) == 1:
        lines.append(f"  module names look like: {suffixes[:20]}")
    return "\n".join(lines)

