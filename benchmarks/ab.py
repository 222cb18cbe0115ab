"""This tree against a previous deltatune (a git revision) and peft, side by side in one process.

    python benchmarks/ab.py --prev 3c259f9            # every figure below, 5 rounds
    python benchmarks/ab.py --prev HEAD~3 --only train --rounds 7

The previous revision's ``src/deltatune`` is exported with ``git archive`` into a temporary folder and
imported as ``deltatune_prev`` (deltatune's modules import each other relatively, so a renamed copy is a
separate library). Each figure is a ratio to the same frozen base, measured in one interleaved, shuffled
run of all contenders (see shared/BENCHMARKS.md), so "this tree vs previous" differences above ~3% are
real. Peak memory is not measured here (``bench.py`` does, per process).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

import bench

CONTENDERS = ("deltatune", "prev", "peft")


def export_previous(rev: str, into: Path) -> None:
    """``src/deltatune`` at ``rev`` as the package ``deltatune_prev`` under ``into``."""
    root = Path(__file__).resolve().parents[1]
    data = subprocess.run(["git", "archive", rev, "src/deltatune"], cwd=root, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    (into / "src" / "deltatune").rename(into / "deltatune_prev")
    sys.path.insert(0, str(into))
    bench.LIBRARIES["prev"] = "deltatune_prev"


def _ratios(t: dict) -> dict:
    return {k: t[k] / t["base"] for k in CONTENDERS}


def train(rounds: int) -> list[tuple]:
    ids = bench.batch(4, 256)
    rows = []
    for label, kwargs in (("LoRA", {}), ("LoRA+dropout", {"dropout": 0.05}), ("DoRA", {"dora": True})):
        models = {"base": bench.adapted("base"), **{k: bench.adapted(k, **kwargs) for k in CONTENDERS}}
        for m in models.values():
            m.train()
        t = bench.best_of({k: bench.train_step_fn(m, ids) for k, m in models.items()}, rounds=rounds, reps=2)
        rows.append((f"{label} train step / frozen-base step (4x256)", _ratios(t)))
    return rows


def infer(rounds: int) -> list[tuple]:
    rows = []
    for label, shape, dora, dtype, reps in (("unmerged LoRA forward / base forward (32x64)", (32, 64), False, None, 3),
                                           ("DoRA decode latency / base decode (1x1, eval)", (1, 1), True, None, 20),
                                           ("LoRA decode latency / base decode (1x1, eval)", (1, 1), False, None, 20),
                                           ("bf16 base: unmerged forward / base forward (32x64)", (32, 64), False,
                                            torch.bfloat16, 3)):
        ids = bench.batch(*shape)
        base = bench.llama() if dtype is None else bench.llama().to(dtype)
        models = {k: bench.adapted(k, dora=dora, dtype=dtype) for k in CONTENDERS}
        bench._nonzero_b(*models.values())
        t = bench.best_of({"base": bench.forward_fn(base, ids), **{k: bench.forward_fn(m, ids) for k, m in models.items()}},
                          rounds=rounds, reps=reps)
        rows.append((label, _ratios(t)))
    return rows


def half_train(rounds: int) -> list[tuple]:
    ids = bench.batch(4, 256)
    models = {"base": bench.adapted("base", dtype=torch.bfloat16),
              **{k: bench.adapted(k, dtype=torch.bfloat16) for k in CONTENDERS}}
    for m in models.values():
        m.train()
    t = bench.best_of({k: bench.autocast_step_fn(m, ids) for k, m in models.items()}, rounds=rounds, reps=2)
    return [("bf16 base: train step under autocast / frozen-base step (4x256)", _ratios(t))]


GROUPS = {"train": train, "infer": infer, "half": half_train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prev", required=True, help="git revision to compare against")
    parser.add_argument("--only", nargs="+", choices=list(GROUPS))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if bench.DEVICE.type == "cpu":
        torch.set_num_threads(2)
    import warnings

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as folder:
        export_previous(args.prev, Path(folder))
        print(f"{bench.machine()}; this tree vs {args.prev} vs peft (ratios to the frozen base)\n")
        print(f"| figure | this tree | {args.prev} | peft 0.21 |\n|---|---|---|---|")
        for name in args.only or list(GROUPS):
            for label, r in GROUPS[name](args.rounds):
                print(f"| {label} | {r['deltatune']:.3f} | {r['prev']:.3f} | {r['peft']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
