"""Side-by-side benchmarks of deltatune and peft on the shared workload (see shared/BENCHMARKS.md).

    python benchmarks/bench.py                 # everything, prints a markdown table
    python benchmarks/bench.py --only train    # one group: train | infer | half | memory | dora | setup | io | quant | mixed
    python benchmarks/bench.py --write         # also rewrite benchmarks/RESULTS.md

Protocol: every figure is a ratio measured in one run. Contenders of a group are interleaved in a
shuffled order each round, after a warm-up; each contender's best round is kept. The device is CUDA when
present (same script), else the CPU with ``torch.set_num_threads(2)``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: Contender name -> module (ab.py adds "prev": a previous deltatune checkout imported under another name).
LIBRARIES = {"peft": "peft", "deltatune": "deltatune"}


# ----------------------------------------------------------------------------- models
def llama(seed: int = 0, device=DEVICE):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=2000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return LlamaForCausalLM(config).to(device)


def adapted(lib: str, dropout: float = 0.0, dora: bool = False, seed: int = 0, dtype=None):
    """The reference model with LoRA r=16, alpha=32 on all linear layers but the LM head (``dtype``: the
    base's dtype, e.g. bfloat16; adapters stay float32 in both libraries, their default)."""
    base = llama(seed)
    if dtype is not None:
        base = base.to(dtype)
    if lib == "base":
        for p in base.parameters():
            p.requires_grad_(False)
        base.enable_input_require_grads()  # the frozen-base step: input gradients flow, no weight grads
        return base
    module = importlib.import_module(LIBRARIES.get(lib, lib))
    kwargs = dict(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS)
    if dora:
        kwargs["use_dora"] = True
    return module.get_peft_model(base, module.LoraConfig(**kwargs))


def batch(b: int, s: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2000, (b, s), generator=g).to(DEVICE)


# ----------------------------------------------------------------------------- timing
def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def best_of(contenders: dict, rounds: int, reps: int, warmup: int = 1) -> dict[str, float]:
    """Seconds per call of each contender: best round, rounds interleaved in shuffled order."""
    rng = random.Random(0)
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        order = list(contenders)
        rng.shuffle(order)
        for name in order:
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                contenders[name]()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / reps)
    return best


def train_step_fn(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:  # frozen base: only the input-embedding activations carry gradients
            model.zero_grad(set_to_none=True)
    return step


def forward_fn(model, ids):
    model.eval()

    def fwd():
        with torch.no_grad():
            model(input_ids=ids)
    return fwd


# ----------------------------------------------------------------------------- groups
def group_train(rounds: int) -> list[tuple]:
    ids = batch(4, 256)
    models = {
        "base": adapted("base"),
        "deltatune LoRA": adapted("deltatune"), "peft LoRA": adapted("peft"),
        "deltatune LoRA+dropout": adapted("deltatune", 0.05), "peft LoRA+dropout": adapted("peft", 0.05),
    }
    for m in models.values():
        m.train()
    t = best_of({k: train_step_fn(m, ids) for k, m in models.items()}, rounds=rounds, reps=2)
    rows = []
    for label in ("LoRA", "LoRA+dropout"):
        dt_ratio, peft_ratio = t[f"deltatune {label}"] / t["base"], t[f"peft {label}"] / t["base"]
        rows.append((f"{label} train step / frozen-base step (4x256)", dt_ratio, peft_ratio))
    rows.append(("(frozen-base train step, seconds)", t["base"], t["base"]))
    return rows


def group_infer(rounds: int) -> list[tuple]:
    ids = batch(32, 64)
    dt_model, peft_model = adapted("deltatune"), adapted("peft")
    _nonzero_b(dt_model, peft_model)
    dt_merged = copy.deepcopy(dt_model).merge_and_unload()
    peft_merged = copy.deepcopy(peft_model).merge_and_unload()
    base = llama()
    fns = {"base": forward_fn(base, ids), "deltatune": forward_fn(dt_model, ids), "peft": forward_fn(peft_model, ids),
           "deltatune merged": forward_fn(dt_merged, ids), "peft merged": forward_fn(peft_merged, ids)}
    t = best_of(fns, rounds=rounds, reps=3)
    return [("unmerged LoRA forward / base forward (32x64)", t["deltatune"] / t["base"], t["peft"] / t["base"]),
            ("merged forward / base forward (32x64)", t["deltatune merged"] / t["base"], t["peft merged"] / t["base"])]


def _nonzero_b(*models) -> None:
    """Give B non-zero values, as after training (a zero B would let a library skip work)."""
    for m in models:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)


def autocast_step_fn(model, ids):
    """A train step with the forward under ``torch.autocast`` (bfloat16), as LLM recipes run it."""
    step = train_step_fn(model, ids)

    def run():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            step()
    return run


def group_half(rounds: int) -> list[tuple]:
    """A bfloat16 base with float32 adapters: unmerged eval forward, and the train step under autocast."""
    bf16 = torch.bfloat16
    ids = batch(32, 64)
    dt_model, peft_model = adapted("deltatune", dtype=bf16), adapted("peft", dtype=bf16)
    _nonzero_b(dt_model, peft_model)
    fns = {"base": forward_fn(llama().to(bf16), ids), "deltatune": forward_fn(dt_model, ids),
           "peft": forward_fn(peft_model, ids)}
    t = best_of(fns, rounds=rounds, reps=3)
    rows = [("bf16 base, fp32 adapters: unmerged forward / base forward (32x64)", t["deltatune"] / t["base"],
             t["peft"] / t["base"])]
    del fns, dt_model, peft_model
    ids = batch(4, 256)
    models = {"base": adapted("base", dtype=bf16), "deltatune": adapted("deltatune", dtype=bf16),
              "peft": adapted("peft", dtype=bf16)}
    for m in models.values():
        m.train()
    t = best_of({k: autocast_step_fn(m, ids) for k, m in models.items()}, rounds=rounds, reps=2)
    rows.append(("bf16 base, fp32 adapters: train step under autocast / frozen-base step (4x256)",
                 t["deltatune"] / t["base"], t["peft"] / t["base"]))
    rows.append(("(bf16 frozen-base step under autocast, seconds)", t["base"], t["base"]))
    return rows


def _peak_rss_of(step) -> int:
    """Peak resident memory (bytes) while ``step`` runs, after resetting the high-water mark."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    step()
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


# glibc's malloc keeps freed memory of a dynamic size in its heap, so the peak RSS of the same step varied by
# +-4% between processes; with a fixed mmap threshold every large tensor is mapped and unmapped on its own
# and the peak RSS follows the live tensors (repeat runs agree within 0.1%).
_PEAK_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def _peak_of(step) -> int:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        return torch.cuda.max_memory_allocated()
    return _peak_rss_of(step)


def saved_activation_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward during one forward (each storage counted once): the
    deterministic part of a train step's peak memory."""
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    del out
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def group_memory(rounds: int) -> list[tuple]:
    """Peak memory of one train step (after warm-up, so optimizer state exists), and the activation
    bytes saved for backward."""
    import subprocess

    ids = batch(4, 256)
    peaks, saved = {}, {}
    for lib in ("deltatune", "peft"):
        for dropout in (0.0, 0.05):
            # A fresh process per contender: a process's peak cannot be shared between models.
            out = subprocess.run([sys.executable, __file__, "--peak-child", lib, str(dropout), str(rounds)],
                                 capture_output=True, text=True, check=True, env=_PEAK_ENV)
            peaks[(lib, dropout)] = int(out.stdout.strip().splitlines()[-1])
            model = adapted(lib, dropout).train()
            saved[(lib, dropout)] = saved_activation_bytes(model, ids)
            del model
            gc.collect()
    return [("peak memory LoRA+dropout step / LoRA step", peaks[("deltatune", 0.05)] / peaks[("deltatune", 0.0)],
             peaks[("peft", 0.05)] / peaks[("peft", 0.0)]),
            ("activations saved for backward, LoRA+dropout / LoRA", saved[("deltatune", 0.05)] / saved[("deltatune", 0.0)],
             saved[("peft", 0.05)] / saved[("peft", 0.0)]),
            ("(LoRA step peak, MiB)", peaks[("deltatune", 0.0)] / 2**20, peaks[("peft", 0.0)] / 2**20),
            ("(LoRA step activations saved, MiB)", saved[("deltatune", 0.0)] / 2**20, saved[("peft", 0.0)] / 2**20)]


def group_setup(rounds: int) -> list[tuple]:
    """get_peft_model on a 7B-shaped Llama built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)

    def inject(lib):
        module = __import__(lib)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)

        def go():
            module.get_peft_model(model, module.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        return go

    times = {"deltatune": [], "peft": []}
    for _ in range(rounds):
        for lib in random.sample(list(times), 2):
            go = inject(lib)
            start = time.perf_counter()
            go()
            times[lib].append(time.perf_counter() - start)
    dt_t, peft_t = min(times["deltatune"]), min(times["peft"])
    return [("get_peft_model, 7B-shaped meta Llama (seconds)", dt_t, peft_t),
            ("get_peft_model time deltatune / peft", dt_t / peft_t, 1.0)]


def group_io(rounds: int) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {lib: adapted(lib) for lib in ("deltatune", "peft")}
        for lib, m in models.items():
            m.save_pretrained(os.path.join(tmp, lib))
        saves = best_of({lib: (lambda m=m, lib=lib: m.save_pretrained(os.path.join(tmp, lib)))
                         for lib, m in models.items()}, rounds=rounds, reps=1)
        bases = {lib: llama() for lib in models}

        def load(lib, **kwargs):
            module = __import__(lib)
            return lambda: module.PeftModel.from_pretrained(copy.deepcopy(bases[lib]), os.path.join(tmp, lib), **kwargs)
        loads = best_of({lib: load(lib) for lib in models}, rounds=rounds, reps=1)
        lean = best_of({lib: load(lib, low_cpu_mem_usage=True) for lib in models}, rounds=rounds, reps=1)
    rows.append(("save_pretrained (seconds)", saves["deltatune"], saves["peft"]))
    rows.append(("from_pretrained incl. a base copy (seconds)", loads["deltatune"], loads["peft"]))
    rows.append(("same, low_cpu_mem_usage=True (seconds)", lean["deltatune"], lean["peft"]))
    return rows


def group_dora(rounds: int) -> list[tuple]:
    """DoRA train step / frozen-base step, DoRA decode latency / base decode, DoRA memory / LoRA memory."""
    import subprocess

    ids = batch(4, 256)
    models = {"base": adapted("base"), "deltatune": adapted("deltatune", dora=True), "peft": adapted("peft", dora=True)}
    for m in models.values():
        m.train()
    t = best_of({k: train_step_fn(m, ids) for k, m in models.items()}, rounds=rounds, reps=2)
    rows = [("DoRA train step / frozen-base step (4x256)", t["deltatune"] / t["base"], t["peft"] / t["base"])]

    one = batch(1, 1)
    decoders = {"base": llama(), "deltatune": adapted("deltatune", dora=True), "peft": adapted("peft", dora=True)}
    for m in decoders.values():
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
    d = best_of({k: forward_fn(m, one) for k, m in decoders.items()}, rounds=rounds, reps=20)
    rows.append(("DoRA decode latency / base decode (1x1, eval)", d["deltatune"] / d["base"], d["peft"] / d["base"]))

    peaks, saved = {}, {}
    for lib in ("deltatune", "peft"):
        for dora in (False, True):
            out = subprocess.run([sys.executable, __file__, "--peak-child", lib, "0.0", str(rounds), str(int(dora))],
                                 capture_output=True, text=True, check=True, env=_PEAK_ENV)
            peaks[(lib, dora)] = int(out.stdout.strip().splitlines()[-1])
            model = adapted(lib, dora=dora).train()
            saved[(lib, dora)] = saved_activation_bytes(model, ids)
            del model
    rows.append(("peak memory DoRA step / LoRA step", peaks[("deltatune", True)] / peaks[("deltatune", False)],
                 peaks[("peft", True)] / peaks[("peft", False)]))
    rows.append(("activations saved for backward, DoRA / LoRA", saved[("deltatune", True)] / saved[("deltatune", False)],
                 saved[("peft", True)] / saved[("peft", False)]))
    return rows


def _param_bytes(model) -> int:
    """Bytes of parameters and buffers, counting 4-bit storage and its quantization statistics."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            for extra in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
                if isinstance(extra, torch.Tensor):
                    total += extra.numel() * extra.element_size()
    return total


def group_quant(rounds: int) -> list[tuple]:
    """Parameter memory of the reference model with LoRA r=16: 4-bit NF4 base / float32 base."""
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        llama(device="cpu").save_pretrained(tmp)
        ratios = {}
        for lib in ("deltatune", "peft"):
            module = __import__(lib)
            config = dict(r=16, lora_alpha=32, target_modules=TARGETS)
            full = module.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp), module.LoraConfig(**config))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
                    device_map=str(DEVICE))
            quant = module.get_peft_model(q, module.LoraConfig(**config))
            ratios[lib] = _param_bytes(quant) / _param_bytes(full)
    rows.append(("parameter bytes, 4-bit NF4 base + LoRA / float32 base + LoRA", ratios["deltatune"], ratios["peft"]))
    return rows


def group_mixed(rounds: int) -> list[tuple]:
    """Mixed-adapter batches (in bench_mixed.py)."""
    from bench_mixed import group_mixed as mixed

    return mixed(rounds)


GROUPS = {"train": group_train, "infer": group_infer, "half": group_half, "memory": group_memory, "dora": group_dora,
          "setup": group_setup, "io": group_io, "quant": group_quant, "mixed": group_mixed}


def machine() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def table(rows: list[tuple]) -> str:
    lines = ["| figure | deltatune | peft 0.21 | deltatune / peft |", "|---|---|---|---|"]
    for name, dt_value, peft_value in rows:
        if peft_value is None:  # peft refuses the case
            lines.append(f"| {name} | {dt_value:.3f} | refused | |")
            continue
        ratio = "" if name.startswith("(") and "/" not in name else f"{dt_value / peft_value:.2f}"
        lines.append(f"| {name} | {dt_value:.3f} | {peft_value:.3f} | {ratio} |")
    return "\n".join(lines)


def peak_child(lib: str, dropout: float, rounds: int, dora: bool = False) -> None:
    """Print the peak memory of one train step of one contender (run in its own process)."""
    import warnings

    warnings.filterwarnings("ignore")
    if DEVICE.type == "cpu":
        torch.set_num_threads(2)
    model = adapted(lib, dropout, dora=dora).train()
    step = train_step_fn(model, batch(4, 256))
    step()
    print(min(_peak_of(step) for _ in range(max(2, rounds // 2))))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peak-child":
        peak_child(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), len(sys.argv) > 5 and sys.argv[5] == "1")
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(GROUPS), help="groups to run (default all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="rewrite benchmarks/RESULTS.md")
    args = parser.parse_args()
    if DEVICE.type == "cpu":
        torch.set_num_threads(2)
    import peft  # noqa: F401  (fail early if the reference is missing)
    import warnings

    warnings.filterwarnings("ignore")
    rows = []
    for name in args.only or list(GROUPS):
        start = time.perf_counter()
        group_rows = GROUPS[name](args.rounds)
        rows += group_rows
        print(table(group_rows).split("\n", 2)[-1], f"   [{name}: {time.perf_counter() - start:.0f}s]", flush=True)
    import peft as peft_module

    header = (f"{datetime.date.today()} on {machine()}; torch {torch.__version__}, peft {peft_module.__version__}; "
              f"command: `python benchmarks/bench.py {' '.join(sys.argv[1:])}`".strip())
    report = header + "\n\n" + table(rows) + "\n"
    print("\n" + report)
    if args.write:  # replaces the table, keeps the hand-written notes below the marker
        path, marker = HERE / "RESULTS.md", "<!-- notes -->"
        old = path.read_text() if path.exists() else ""
        notes = old[old.index(marker):] if marker in old else marker + "\n"
        path.write_text("# Benchmark results\n\n" + report + "\n" + notes)


if __name__ == "__main__":
    main()
