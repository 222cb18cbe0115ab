"""Many adapters on one base: combine two LoRA adapters, then hot-swap adapters into a compiled model.

Runs offline in a few seconds on a tiny randomly initialised Llama (replace it with your model):

    python examples/combine_and_hotswap.py
"""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune import LoraConfig, PeftModel, get_peft_model, hotswap_adapter, prepare_model_for_compiled_hotswap


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def trained_adapter(folder: str, seed: int, r: int, alpha: int) -> None:
    """Stands in for a real fine-tuning run: an adapter with random (non-zero) factors, saved."""
    model = get_peft_model(base_model(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)


def main() -> dict:
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as root:
        math, code = f"{root}/math", f"{root}/code"
        trained_adapter(math, seed=1, r=8, alpha=16)
        trained_adapter(code, seed=2, r=4, alpha=4)

        # 1. Combine: one adapter holding 0.7 of one and 0.3 of the other (cat: exact, rank 8 + 4).
        model = PeftModel.from_pretrained(base_model(), math, adapter_name="math")
        model.load_adapter(code, adapter_name="code")
        model.add_weighted_adapter(["math", "code"], [0.7, 0.3], "blend", combination_type="cat")
        model.set_adapter("blend")
        with torch.no_grad():
            blended = model(ids).logits

        # 2. Hot-swap into a compiled model: pad ranks and make scalings tensors first, then compile once.
        model = PeftModel.from_pretrained(base_model(), math)
        prepare_model_for_compiled_hotswap(model, target_rank=8)
        compiled = torch.compile(model, backend="eager")  # any backend; "eager" keeps this example quick
        with torch.no_grad():
            before = compiled(ids).logits
            hotswap_adapter(model, code, adapter_name="default")  # in place: no re-wrapping, no recompile
            after = compiled(ids).logits
        fresh = PeftModel.from_pretrained(base_model(), code)
        with torch.no_grad():
            swap_diff = (after - fresh(ids).logits).abs().max().item()
    print(f"blend changed the logits by {(blended - before).abs().max().item():.3f}; "
          f"hot-swapped model vs a fresh load of the second adapter: max abs diff {swap_diff:.1e}")
    return {"swap_diff": swap_diff, "changed": (after - before).abs().max().item()}


if __name__ == "__main__":
    main()
