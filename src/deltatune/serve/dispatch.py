"""One model call for rows of many adapters: mixed-adapter batches when the layers take
``adapter_names=``, else one call per adapter group.

Whether the layers honour ``adapter_names`` cannot be read off the model: transformers models take
``**kwargs`` and may drop an unknown keyword without a word. So the first time a batch holds two adapters
whose outputs differ, the dispatcher runs a probe both ways and keeps the mixed call only if it gives
the grouped call's outputs; until then, and after a failed probe, it groups.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

#: The ``adapter_names`` entry for a row that runs on the plain base model.
BASE = "__base__"

log = logging.getLogger("deltatune.serve")

#: ``call(rows, adapter_names)``: the model outputs for input rows ``rows`` (indices into the batch,
#: repeats allowed), all under the active adapter when ``adapter_names`` is None, else one name per row.
Call = Callable[[list[int], Optional[list[str]]], tuple[torch.Tensor, ...]]


class Dispatcher:
    """Runs batches of many adapters as one mixed call where that was verified, else per adapter group.

    In ``auto`` mode every adapter is verified before its rows join a mixed call: the first batch that
    holds an adapter not verified yet runs a probe (row 0 under each adapter of the batch, grouped and
    mixed). An implementation may honour ``adapter_names`` for some adapter kinds and not others, so
    one good probe does not vouch for adapters loaded later. A failed probe, or a mixed call that
    raises, turns that kind of call to groups for good.

    Args:
        activate: ``activate(name)``: a context manager under which the model runs adapter ``name``
            alone (``None``: the plain base model). Called only from the thread that owns the model.
        mode: ``"auto"`` (probe), ``"mixed"`` (trust ``adapter_names``) or ``"grouped"`` (never use it).
    """

    def __init__(self, activate, mode: str = "auto"):
        if mode not in ("auto", "mixed", "grouped"):
            raise ValueError(f"mode must be auto, mixed or grouped, got {mode!r}")
        self.activate, self.default = activate, mode
        self.modes: dict[str, str] = {}  # per kind of call: a forward with a cache may differ from one without
        self.verified: dict[str, set] = {}  # per kind: adapters (None: the base) whose mixed rows were checked
        self.model_calls = 0  # forward calls made (a grouped batch of k adapters makes k)

    @property
    def mode(self) -> str:
        """The mode of the plain (``forward``) calls."""
        return self.modes.get("forward", self.default)

    def forget(self, name: str) -> None:
        """Adapter ``name`` was removed: one loaded later under that name is verified anew."""
        for names in self.verified.values():
            names.discard(name)

    def run(self, names: Sequence[Optional[str]], call: Call, kind: str = "forward") -> tuple[torch.Tensor, ...]:
        """Outputs for every row of a batch whose row ``i`` runs adapter ``names[i]`` (None: the base).

        ``kind`` names the sort of call (e.g. ``prefill``, ``decode``): each is verified on its own."""
        distinct = list(dict.fromkeys(names))
        if len(distinct) == 1:
            return self._one(distinct[0], list(range(len(names))), call)
        mode = self.modes.setdefault(kind, self.default)
        verified = self.verified.setdefault(kind, set())
        if mode != "grouped" and self.default == "auto" and not verified.issuperset(distinct):
            self._probe(distinct, call, kind)
            mode = self.modes[kind]
        if mode == "grouped" or (self.default == "auto" and not verified.issuperset(distinct)):
            return self._grouped(names, distinct, call)
        try:
            self.model_calls += 1
            return call(list(range(len(names))), [BASE if n is None else n for n in names])
        except Exception as exc:  # e.g. an adapter kind the mixed path does not take: group from now on
            log.warning("%s: a mixed-adapter call failed (%s: %s); grouping rows by adapter from now on", kind,
                        type(exc).__name__, exc)
            self.modes[kind] = "grouped"
            return self._grouped(names, distinct, call)

    def _one(self, name: Optional[str], rows: list[int], call: Call) -> tuple[torch.Tensor, ...]:
        self.model_calls += 1
        with self.activate(name):
            return call(rows, None)

    def _grouped(self, names, distinct, call: Call) -> tuple[torch.Tensor, ...]:
        parts, order = [], []
        for name in distinct:
            rows = [i for i, n in enumerate(names) if n == name]
            parts.append(self._one(name, rows, call))
            order += rows
        # Put rows back in batch order: position order[j] holds the j-th row computed.
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return tuple(torch.cat([p[k] for p in parts])[inverse.to(parts[0][k].device)] for k in range(len(parts[0])))

    def _probe(self, distinct: list[Optional[str]], call: Call, kind: str) -> None:
        """Run row 0 under every adapter of the batch, grouped and mixed; verify the adapters if they agree
        (and are not all alike on that row, where a call that ignored the names would pass too)."""
        grouped = [self._one(n, [0], call) for n in distinct]
        reference = tuple(torch.cat([g[k] for g in grouped]) for k in range(len(grouped[0])))
        first = reference[0]
        if all(torch.allclose(first[i], first[0], rtol=1e-5, atol=1e-6) for i in range(1, len(first))):
            return  # nothing to tell apart on this row: the batch runs grouped, a later one decides
        try:
            self.model_calls += 1
            mixed = call([0] * len(distinct), [BASE if n is None else n for n in distinct])
            same = all(m.shape == r.shape and torch.allclose(m.float(), r.float(), rtol=1e-4, atol=1e-5)
                       for m, r in zip(mixed, reference))
        except Exception as exc:  # the mixed path does not take these adapters at all
            log.info("%s: mixed-adapter batches unavailable (%s: %s); grouping rows by adapter", kind,
                     type(exc).__name__, exc)
            same = False
        if same:
            self.verified[kind].update(distinct)
            self.modes[kind] = "mixed"
        else:
            self.modes[kind] = "grouped"
        log.info("%s: mixed-adapter rows for %s %s", kind, [BASE if n is None else n for n in distinct],
                 "verified: one call per batch" if same else "differ from per-adapter calls; grouping rows by adapter")
