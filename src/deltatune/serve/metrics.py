"""Counters and histograms for ``GET /metrics`` in Prometheus' text format (written here: a few dozen
lines, not worth a dependency)."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Iterable, Optional

#: Bucket bounds: request latency (seconds) and batch size (rows).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{suffix} {self.total:.6f}", f"{name}_count{suffix} {self.count}"]


def _label(value: Optional[str]) -> str:
    return (value or "").replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """What the server counts; every method is safe to call from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.batch_rows = _Histogram(BATCH_BUCKETS)
        self.batch_adapters = _Histogram(BATCH_BUCKETS)
        self.rows: dict[str, int] = defaultdict(int)
        self.input_tokens = 0
        self.output_tokens = 0

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latency.setdefault(route, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, rows: int, adapters: int, seconds: float) -> None:
        with self._lock:
            self.batch_rows.observe(rows)
            self.batch_adapters.observe(adapters)

    def served(self, model: str, rows: int, input_tokens: int, output_tokens: int = 0) -> None:
        with self._lock:
            self.rows[model] += rows
            self.input_tokens += input_tokens
            self.output_tokens += output_tokens

    def render(self, loaded: Iterable[str], known: Iterable[str], waiting: dict, running: dict,
               loads: int = 0, model_calls: int = 0, modes: Optional[dict] = None) -> str:
        """The text exposition; the arguments are read from the server now (adapters on the device and
        known, rows waiting and running per model, adapter loads from disk, model calls, batching mode per
        kind of call)."""
        loaded = set(loaded)
        with self._lock:
            out = ["# HELP deltatune_requests_total HTTP requests by route and status.",
                   "# TYPE deltatune_requests_total counter"]
            out += [f'deltatune_requests_total{{route="{_label(r)}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.requests.items())]
            out += ["# HELP deltatune_request_seconds Request latency.", "# TYPE deltatune_request_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                out += h.lines("deltatune_request_seconds", f'route="{_label(route)}"')
            out += ["# HELP deltatune_batch_rows Rows per model batch.", "# TYPE deltatune_batch_rows histogram"]
            out += self.batch_rows.lines("deltatune_batch_rows")
            out += ["# HELP deltatune_batch_adapters Distinct adapters per model batch.",
                    "# TYPE deltatune_batch_adapters histogram"]
            out += self.batch_adapters.lines("deltatune_batch_adapters")
            out += ["# HELP deltatune_rows_total Inputs served per model (base or adapter).",
                    "# TYPE deltatune_rows_total counter"]
            out += [f'deltatune_rows_total{{model="{_label(m)}"}} {n}' for m, n in sorted(self.rows.items())]
            out += ["# HELP deltatune_input_tokens_total Input tokens processed.",
                    "# TYPE deltatune_input_tokens_total counter", f"deltatune_input_tokens_total {self.input_tokens}",
                    "# HELP deltatune_output_tokens_total Tokens generated.",
                    "# TYPE deltatune_output_tokens_total counter",
                    f"deltatune_output_tokens_total {self.output_tokens}"]
        out += ["# HELP deltatune_adapter_loaded Whether an adapter is on the device now (1) or on disk (0).",
                "# TYPE deltatune_adapter_loaded gauge"]
        out += [f'deltatune_adapter_loaded{{adapter="{_label(n)}"}} {int(n in loaded)}' for n in sorted(known)]
        for kind, counts in (("waiting", waiting), ("running", running)):
            out += [f"# HELP deltatune_{kind}_rows Rows {kind} per model.", f"# TYPE deltatune_{kind}_rows gauge"]
            out += [f'deltatune_{kind}_rows{{model="{_label(m)}"}} {n}' for m, n in sorted(counts.items())]
        out += ["# HELP deltatune_adapter_loads_total Adapter loads from disk (first loads and reloads after eviction).",
                "# TYPE deltatune_adapter_loads_total counter", f"deltatune_adapter_loads_total {loads}",
                "# HELP deltatune_model_calls_total Model forward calls (a grouped batch of k adapters makes k).",
                "# TYPE deltatune_model_calls_total counter", f"deltatune_model_calls_total {model_calls}",
                "# HELP deltatune_mixed_batches Whether batches of many adapters run as one call (1), per adapter "
                "(0), or are not probed yet (-1), per kind of call.", "# TYPE deltatune_mixed_batches gauge"]
        values = {"mixed": 1, "grouped": 0, "auto": -1}
        out += [f'deltatune_mixed_batches{{kind="{_label(k)}"}} {values.get(m, -1)}' for k, m in sorted((modes or {}).items())]
        return "\n".join(out) + "\n"
