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
    """Chooses, once, between mixed-adapter calls and per-adapter groups, and runs batches with it.

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
        self.model_calls = 0  # forward calls made (a grouped batch of k adapters makes k)

    @property
    def mode(self) -> str:
        """The mode of the plain (``forward``) calls."""
        return self.modes.get("forward", self.default)

    def run(self, names: Sequence[Optional[str]], call: Call, kind: str = "forward") -> tuple[torch.Tensor, ...]:
        """Outputs for every row of a batch whose row ``i`` runs adapter ``names[i]`` (None: the base).

        ``kind`` names the sort of call (e.g. ``prefill``, ``decode``): each is probed on its own."""
        distinct = list(dict.fromkeys(names))
        if len(distinct) == 1:
            return self._one(distinct[0], list(range(len(names))), call)
        if self.modes.setdefault(kind, self.default) == "auto":
            self.modes[kind] = self._probe(distinct, call, kind)
        if self.modes[kind] == "mixed":
            self.model_calls += 1
            return call(list(range(len(names))), [BASE if n is None else n for n in names])
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

    def _probe(self, distinct: list[Optional[str]], call: Call, kind: str) -> str:
        """Run row 0 under every adapter of the batch, grouped and mixed; the mode they call for."""
        rows = [0] * len(distinct)
        grouped = [self._one(n, [0], call) for n in distinct]
        reference = tuple(torch.cat([g[k] for g in grouped]) for k in range(len(grouped[0])))
        first = reference[0]
        if all(torch.allclose(first[i], first[0], rtol=1e-5, atol=1e-6) for i in range(1, len(first))):
            return "auto"  # the adapters agree on this row: a mixed call that ignored names would pass
        try:
            self.model_calls += 1
            mixed = call(rows, [BASE if n is None else n for n in distinct])
        except (TypeError, ValueError, KeyError, NotImplementedError) as exc:
            log.info("%s: mixed-adapter batches unavailable (%s: %s); grouping rows by adapter", kind,
                     type(exc).__name__, exc)
            return "grouped"
        same = all(m.shape == r.shape and torch.allclose(m.float(), r.float(), rtol=1e-4, atol=1e-5)
                   for m, r in zip(mixed, reference))
        log.info("%s: mixed-adapter batches %s", kind, "verified: one call per batch" if same
                 else "give other outputs than per-adapter calls; grouping rows by adapter")
        return "mixed" if same else "grouped"
