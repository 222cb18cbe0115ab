"""QLoRA: adapters on bitsandbytes 4-bit (NF4/FP4, double quantization) and 8-bit bases, on the CPU."""

from __future__ import annotations


import peft
import pytest
import torch

import deltatune as dt
from conftest import QUANT_CONFIGS, load_llama64, random_lora

bnb = pytest.importorskip("bitsandbytes")  # installed by the test extra; CI always runs these

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANT = list(QUANT_CONFIGS)  # every bitsandbytes setting of conftest.QUANT_CONFIGS
IDS = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()



@pytest.mark.parametrize("quant", QUANT)
def test_qlora_training_lowers_the_loss_and_only_adapters_learn(llama64_dir, quant):
    model = dt.prepare_model_for_kbit_training(load_llama64(llama64_dir, quant))
    model = dt.get_peft_model(model, dt.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=TARGETS))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ in ("Linear4bit", "Linear8bitLt")
    assert layer.adapters["default"].lora_A.dtype == torch.float32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all("lora_" in n for n in with_grad)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merge_into_a_quantized_base_requantizes(llama64_dir, quant):
    model = dt.get_peft_model(load_llama64(llama64_dir, quant), dt.LoraConfig(r=8, target_modules=TARGETS))
    random_lora(model, scale=0.05)
    unmerged = logits(model)
    adapter_effect = (unmerged - logits(load_llama64(llama64_dir, quant))).abs().max().item()
    quant_error = (logits(load_llama64(llama64_dir)) - logits(load_llama64(llama64_dir, quant))).abs().max().item()
    with pytest.warns(UserWarning, match="quantizes again"):
        merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    diff = (logits(merged) - unmerged).abs().max().item()
    print(f"\n{quant}: merged vs unmerged max abs logit diff {diff:.4f}; the base's own quantization error "
          f"{quant_error:.4f}; the adapter's effect {adapter_effect:.4f}")
    # The adapter must move the logits well past the tolerance below, or a merge that lost it would pass.
    assert adapter_effect > 3 * quant_error
    assert diff <= 3 * quant_error  # one more rounding to the quantization grid, nothing more


def test_adapter_moves_between_4bit_and_float_bases_and_matches_peft(llama64_dir, tmp_path):
    q_model = dt.get_peft_model(load_llama64(llama64_dir, "nf4"), dt.LoraConfig(r=8, target_modules=TARGETS))
    random_lora(q_model, scale=0.05)
    q_out = logits(q_model)
    q_model.save_pretrained(str(tmp_path))
    # The same adapter on the float32 base: within the base's own quantization error.
    f_out = logits(dt.PeftModel.from_pretrained(load_llama64(llama64_dir), str(tmp_path)))
    base_error = (logits(load_llama64(llama64_dir)) - logits(load_llama64(llama64_dir, "nf4"))).abs().max().item()
    assert (f_out - q_out).abs().max().item() <= 1.5 * base_error + 1e-4
    # peft with the same adapter on the same 4-bit base gives the same outputs.
    p_out = logits(peft.PeftModel.from_pretrained(load_llama64(llama64_dir, "nf4"), str(tmp_path)))
    torch.testing.assert_close(q_out, p_out, rtol=0, atol=1e-5)


def test_dora_on_a_4bit_base_matches_peft(llama64_dir):
    pm = peft.get_peft_model(load_llama64(llama64_dir, "nf4"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     use_dora=True, init_lora_weights=False))
    random_lora(pm, seed=3, scale=0.05)
    dm = dt.get_peft_model(load_llama64(llama64_dir, "nf4"), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    dt.set_peft_model_state_dict(dm, peft.get_peft_model_state_dict(pm))
    # Train mode first: bitsandbytes repacks 4-bit weights for its CPU kernel after an eval-mode forward,
    # and peft 0.21 then dequantizes that layout as is (scrambled norms); deltatune unpacks it.
    pm.train(), dm.train()
    want = pm(input_ids=IDS).logits.detach()
    torch.testing.assert_close(dm(input_ids=IDS).logits.detach(), want, rtol=0, atol=1e-5)
    # After the repack bitsandbytes runs another CPU kernel whose rounding differs; measure it on the base.
    base = load_llama64(llama64_dir, "nf4").train()
    kernel_diff = (base(input_ids=IDS).logits.detach() - logits(base.eval())).abs().max().item()
    dm.eval()
    assert (logits(dm) - want).abs().max().item() <= 2 * kernel_diff + 1e-5


def test_parameter_counts_unpack_4bit(llama64_dir):
    f_model = dt.get_peft_model(load_llama64(llama64_dir), dt.LoraConfig(r=8, target_modules=TARGETS))
    q_model = dt.get_peft_model(load_llama64(llama64_dir, "nf4"), dt.LoraConfig(r=8, target_modules=TARGETS))
    assert q_model.get_nb_trainable_parameters() == f_model.get_nb_trainable_parameters()
    pm = peft.get_peft_model(load_llama64(llama64_dir, "nf4"), peft.LoraConfig(r=8, target_modules=TARGETS))
    assert q_model.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_a_stock_trainer_trains_a_deltatune_model_on_a_4bit_base(llama64_dir, tmp_path):
    """transformers' Trainer refuses "purely quantized" models unless they carry adapters (a peft PeftModel or
    transformers' own adapter flag): a deltatune PeftModel on a 4-bit base must pass that check and train."""
    from transformers import Trainer, TrainingArguments

    model = dt.prepare_model_for_kbit_training(load_llama64(llama64_dir, "nf4"))
    model = dt.get_peft_model(model, dt.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    rows = [{"input_ids": IDS[i], "labels": IDS[i]} for i in range(len(IDS))]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", learning_rate=1e-2, use_cpu=True)
    Trainer(model=model, args=args, train_dataset=rows).train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)
    assert not getattr(model.base_model.model, "_hf_peft_config_loaded", False)  # (the user's model untouched)
