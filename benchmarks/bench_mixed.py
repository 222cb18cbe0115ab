"""Mixed-adapter batches, side by side with peft (``bench.py --only mixed``; see shared/BENCHMARKS.md).

One base with 32 LoRA adapters (r=16, alpha=32, the reference targets, non-zero B) per library; each
figure names some of them row by row (``adapter_names``) and is divided by the plain base model's latency
on the same input, measured in the same interleaved rounds. DoRA: 4 DoRA adapters (peft refuses DoRA in
mixed batches).
"""

from __future__ import annotations

import importlib

import torch

import bench


def _many(lib: str, count: int, dora: bool = False):
    module = importlib.import_module(bench.LIBRARIES.get(lib, lib))
    model = None
    for i in range(count):
        config = module.LoraConfig(r=16, lora_alpha=32, target_modules=bench.TARGETS, use_dora=dora)
        if model is None:
            model = module.get_peft_model(bench.llama(), config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model.eval()


def _call(model, ids, names=None):
    kwargs = {} if names is None else {"adapter_names": names}

    def run():
        with torch.no_grad():
            model(input_ids=ids, **kwargs)
    return run


def _generate(model, ids, names=None, new_tokens: int = 16):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (KV cache on): ``new_tokens - 1`` of the steps
    decode one token per row, so the ratio to the base is mostly decode's."""
    kwargs = {} if names is None else {"adapter_names": names}

    def run():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return run


def _ratios(base, models: dict, ids, names, rounds: int, reps: int, call=_call) -> dict:
    fns = {"base": call(base, ids)}
    fns.update({lib: call(m, ids, names) for lib, m in models.items()})
    t = bench.best_of(fns, rounds=rounds, reps=reps)
    return {lib: t[lib] / t["base"] for lib in models}


def group_mixed(rounds: int) -> list[tuple]:
    base = bench.llama().eval()
    models = {lib: _many(lib, 32) for lib in ("deltatune", "peft")}
    rows = []
    r = _ratios(base, models, bench.batch(4, 1), None, rounds, reps=20)  # context: one active adapter
    rows.append(("(one active adapter, no adapter_names) decode / base decode (4x1, eval)", r["deltatune"], r["peft"]))
    r = _ratios(base, models, bench.batch(4, 1), [f"a{i}" for i in range(4)], rounds, reps=20)
    rows.append(("mixed decode, 4 adapters / base decode (4x1, eval)", r["deltatune"], r["peft"]))
    r = _ratios(base, models, bench.batch(32, 64), [f"a{i % 8}" for i in range(32)], rounds, reps=2)
    rows.append(("mixed prefill, 8 adapters / base prefill (32x64, eval)", r["deltatune"], r["peft"]))
    prompt = bench.batch(4, 8)
    r = _ratios(base, models, prompt, [f"a{i}" for i in range(4)], rounds, reps=2, call=_generate)
    rows.append(("mixed generate, 4 adapters / base generate (4 x 8 prompt + 16 new tokens, KV cache)",
                 r["deltatune"], r["peft"]))
    r = _ratios(base, models, bench.batch(32, 8), [f"a{i}" for i in range(32)], rounds, reps=1, call=_generate)
    rows.append(("mixed generate, 32 distinct adapters in 32 rows / base generate (32 x 8 + 16 new)",
                 r["deltatune"], r["peft"]))
    ids = bench.batch(32, 1)
    for distinct in (1, 2, 4, 8, 16, 32):
        r = _ratios(base, models, ids, [f"a{i % distinct}" for i in range(32)], rounds, reps=10)
        rows.append((f"mixed decode, {distinct} distinct adapters in 32 rows / base decode (32x1)",
                     r["deltatune"], r["peft"]))
    del models
    dora = {"deltatune": _many("deltatune", 4, dora=True)}
    r = _ratios(base, dora, bench.batch(4, 1), [f"a{i}" for i in range(4)], rounds, reps=20)
    rows.append(("DoRA mixed decode, 4 adapters / base decode (4x1, eval)", r["deltatune"], None))
    r = _ratios(base, dora, prompt, [f"a{i}" for i in range(4)], rounds, reps=2, call=_generate)
    rows.append(("DoRA mixed generate, 4 adapters / base generate (4 x 8 + 16 new)", r["deltatune"], None))
    return rows
