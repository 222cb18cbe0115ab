"""Resuming under FSDP2, and QLoRA + FSDP2 (bitsandbytes' CPU 4-bit path), 2 processes (torchrun, gloo).

``dist_scripts/fsdp2_resume.py`` does the work: one reference process trains ``STEPS`` steps unsharded;
the sharded run (2 processes) either stops halfway, saves the adapter and the optimizer state, and resumes
from those files in a fresh, freshly sharded model (the adapter loaded before sharding), or trains a 4-bit
base whose packed weights are sharded too. Tolerance: float32 rounding of the gradient reduction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytest.importorskip("bitsandbytes")

SCRIPT = Path(__file__).parent / "dist_scripts" / "fsdp2_resume.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TOL = 1e-5


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2-resume")
    for cmd in ([sys.executable, str(SCRIPT), str(folder), "reference"],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
                 str(folder), "sharded"]):
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-4000:]
    return folder


def _diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sorted(x) == sorted(y)
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_resume_from_saved_adapter_and_optimizer_matches_uninterrupted_run(out):
    run = out / "resume"
    result = json.loads((run / "sharded.json").read_text())
    assert result["world"] == 2 and result["all_dtensor"]
    assert _diff(run / "resumed", run / "reference") <= TOL
    # Without the optimizer state (AdamW's moments start again from zero) the run differs: the saved state
    # is what made the match, and the halfway adapter is not already the final one.
    assert _diff(run / "restarted", run / "reference") > 1e-3
    assert _diff(run / "half", run / "reference") > 1e-3


@pytest.mark.parametrize("storage", ["float32", "uint8"])
def test_qlora_base_sharded_trains_like_one_process(out, storage):
    run = out / f"qlora-{storage}"
    result = json.loads((run / "sharded.json").read_text())
    dtype, rows = result["packed_weight_full"]
    assert dtype == f"torch.{storage}" and result["all_dtensor"]
    assert result["packed_weight_local"][0] * 2 == rows[0]  # each rank holds half of the packed 4-bit rows
    assert _diff(run / "sharded", run / "reference") <= TOL
    assert _diff(run / "init", run / "reference") > 1e-3  # it did train
