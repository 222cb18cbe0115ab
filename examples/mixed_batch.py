"""Many adapters in one batch: each prompt through its own adapter, in one forward / generate call.

Runs offline in a few seconds on a tiny randomly initialised Llama (replace it with your model):

    python examples/mixed_batch.py
"""

from __future__ import annotations

import tempfile

import torch
from combine_and_hotswap import base_model, trained_adapter

from deltatune import PeftModel


def main() -> dict:
    prompts = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(3))
    names = ["math", "code", "__base__", "math"]  # one per row; "__base__": the plain base model
    with tempfile.TemporaryDirectory() as root:
        trained_adapter(f"{root}/math", seed=1, r=8, alpha=16)
        trained_adapter(f"{root}/code", seed=2, r=4, alpha=4)  # ranks may differ
        model = PeftModel.from_pretrained(base_model(), f"{root}/math", adapter_name="math")
        model.load_adapter(f"{root}/code", adapter_name="code")

        with torch.no_grad():
            logits = model(prompts, adapter_names=names).logits
            tokens = model.generate(prompts, attention_mask=torch.ones_like(prompts), adapter_names=names,
                                    max_new_tokens=5, do_sample=False)

        # The same rows one at a time, each with its adapter active: the same numbers.
        worst, same_tokens = 0.0, True
        for i, name in enumerate(names):
            with torch.no_grad():
                if name == "__base__":
                    with model.disable_adapter():
                        alone = model(prompts[i:i + 1]).logits
                        alone_tokens = model.generate(prompts[i:i + 1], attention_mask=torch.ones_like(prompts[i:i + 1]),
                                                  max_new_tokens=5, do_sample=False)
                else:
                    model.set_adapter(name)
                    alone = model(prompts[i:i + 1]).logits
                    alone_tokens = model.generate(prompts[i:i + 1], attention_mask=torch.ones_like(prompts[i:i + 1]),
                                                  max_new_tokens=5, do_sample=False)
            worst = max(worst, (logits[i] - alone[0]).abs().max().item())
            same_tokens &= torch.equal(tokens[i], alone_tokens[0])
    print(f"mixed batch vs one row at a time: max abs logit diff {worst:.1e}, same generated tokens: {same_tokens}")
    return {"max_diff": worst, "same_tokens": same_tokens}


if __name__ == "__main__":
    main()
