"""An FSDP-wrapped model's adapter state dict has the keys a saved adapter has (one process, gloo, CPU)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

import deltatune as dt
from conftest import tiny_llama


@pytest.fixture
def process_group():
    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("bias", ["none", "all"])
def test_get_and_set_state_dict_through_fsdp(process_group, bias):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], bias=bias,
                                                          init_lora_weights=False))
    want = {k: v.clone() for k, v in dt.get_peft_model_state_dict(model).items()}
    wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
    assert any("_fsdp_wrapped_module." in n for n, _ in wrapped.named_parameters())
    got = dt.get_peft_model_state_dict(wrapped)
    assert got.keys() == want.keys()  # no "_fsdp_wrapped_module." prefix: the file loads anywhere
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    from_state = dt.get_peft_model_state_dict(wrapped, state_dict=wrapped.state_dict())
    assert from_state.keys() == want.keys()
    dt.set_peft_model_state_dict(wrapped, {k: v * 2 for k, v in want.items()})
    for k, v in dt.get_peft_model_state_dict(model).items():
        torch.testing.assert_close(v, want[k] * 2, rtol=0, atol=0)
