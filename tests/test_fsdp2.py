"""FSDP2 (``fully_shard``) with adapters: 2 processes (torchrun, gloo, CPU) against 1 unsharded process.

``dist_scripts/fsdp2_train.py`` does the work in the subprocesses; these tests compare what it saved and
measured: the adapter trained sharded (loaded before sharding, ``fully_shard`` per decoder layer and at the
root) equals the one-process run with the same global batches, both ways of saving write a normal peft
folder that loads in deltatune and in peft, and ``get/set_peft_model_state_dict`` handle ``DTensor`` shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from conftest import tiny_llama

SCRIPT = Path(__file__).parent / "dist_scripts" / "fsdp2_train.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TOL = 1e-5


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module", params=["lora", "dora"])
def runs(request, tmp_path_factory):
    """The reference run and the 2-process sharded run of one method; their output folder."""
    out = tmp_path_factory.mktemp(f"fsdp2-{request.param}")
    _run([sys.executable, str(SCRIPT), str(out), request.param, "reference"])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
          str(out), request.param, "sharded"])
    return out, json.loads((out / "sharded.json").read_text())


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_sharded_training_saves_the_one_process_adapter(runs):
    out, result = runs
    assert result["world"] == 2 and result["all_dtensor"]  # the adapter really was sharded
    assert result["plain_complete_on_every_rank"]  # save_pretrained returned once rank 0 had written
    ref, init = _weights(out / "reference"), _weights(out / "init")
    assert _max_diff(_weights(out / "plain"), ref) <= TOL
    assert _max_diff(_weights(out / "all_ranks_folder"), ref) <= TOL  # checkpoint.save_adapters, every rank
    assert _max_diff(ref, init) > 1e-3  # the adapter did train (a no-op training would also match)
    assert json.loads((out / "plain" / "adapter_config.json").read_text()) == \
        json.loads((out / "reference" / "adapter_config.json").read_text())
    assert sorted(p.name for p in (out / "plain").iterdir()) == sorted(p.name for p in (out / "reference").iterdir())


def test_full_state_dict_saved_on_rank0_alone(runs):
    out, result = runs
    assert max(result["full_from_peft_helper"].values()) == 0  # get_peft_model_state_dict(model, state_dict=full)
    # save_adapter (what save_pretrained runs per adapter) with the full state dict, called on rank 0 only
    assert _max_diff(_weights(out / "full_direct"), _weights(out / "reference")) <= TOL
    assert _max_diff(_weights(out / "full_folder"), _weights(out / "reference")) <= TOL  # save_adapters


def test_save_pretrained_with_state_dict_on_rank0(runs):
    out, result = runs
    assert result["save_pretrained_forwards_state_dict"]
    assert _max_diff(_weights(out / "full"), _weights(out / "reference")) <= TOL


def test_state_dict_helpers_on_dtensor_shards(runs):
    _, result = runs
    assert result["set_shards_diff"] == 0  # set_peft_model_state_dict with DTensor values
    assert result["set_full_diff"] == 0  # ... and with full tensors read from a file, cut into shards
    assert result["logits_diff"] <= TOL  # the sharded model then computes the reference outputs


def test_sharded_save_loads_in_deltatune_and_peft(runs):
    import peft

    out, _ = runs
    probe = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(99))
    want = torch.load(out / "reference_logits.pt")
    ours = dt.PeftModel.from_pretrained(tiny_llama(), str(out / "plain")).eval()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(out / "plain")).eval()
    with torch.no_grad():
        assert float((ours(input_ids=probe).logits - want).abs().max()) <= TOL
        assert float((theirs(input_ids=probe).logits - want).abs().max()) <= TOL
