"""``deltatune ab``: the seeds' A/B test: head-only baseline vs each adapter method, several seeds.

Every run uses the same data, split and base weights; only the seed changes. The table reports the
held-out metric as mean +- std over seeds, training time and adapter size.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from .chat import is_chat
from .data import load_text_data
from .options import RunOptions, UsageError
from .report import file_bytes, human_bytes
from .train import (RunFolder, is_main_process, load_tokenizer, model_dir, quiet_transformers, run_baseline, run_one,
                    use_threads)


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {std:.3f}"


def ab_command(o: RunOptions) -> dict:
    quiet_transformers()
    use_threads(o)
    data = load_text_data(o)
    if is_chat(data.train):
        raise UsageError("deltatune ab compares classification or plain-text runs; for chat data use "
                         "deltatune train (it reports the untuned model next to the adapter)")
    base_path = model_dir(o)
    tokenizer = load_tokenizer(base_path)
    metric = "eval_accuracy" if o.task == "seq-cls" else "eval_perplexity"
    arms = (["head-only"] if o.baseline and o.task == "seq-cls" else []) + list(o.methods)
    results: dict[str, dict[str, list]] = {arm: {"metric": [], "seconds": [], "bytes": []} for arm in arms}
    folder = RunFolder(o.output or os.path.join("runs", f"ab-{time.strftime('%Y%m%d-%H%M%S')}"), o.overwrite)
    with folder as workdir:
        for seed in o.seeds:
            seeded = RunOptions(**{**o.to_dict(), "seed": seed})
            for arm in arms:
                if arm == "head-only":
                    fit = run_baseline(seeded, data, tokenizer, base_path, workdir)
                    size = 0
                else:
                    fit, model = run_one(seeded, data, tokenizer, base_path, workdir, arm)
                    adapter_dir = os.path.join(workdir, "adapters", f"{arm}-seed{seed}")
                    if is_main_process():
                        model.save_pretrained(adapter_dir)
                    size = file_bytes(os.path.join(adapter_dir, "adapter_model.safetensors"))
                results[arm]["metric"].append(fit.history[-1].get(metric, float("nan")))
                results[arm]["seconds"].append(fit.seconds)
                results[arm]["bytes"].append(size)
        if not is_main_process():
            return {}
        rows = [("arm", f"{metric.replace('eval_', '')} (mean +- std, {len(o.seeds)} seeds)", "train time", "adapter size")]
        for arm, r in results.items():
            rows.append((arm, _stat(r["metric"]), f"{statistics.mean(r['seconds']):.1f}s",
                         human_bytes(int(statistics.mean(r["bytes"]))) if r["bytes"][0] else "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        table = "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows)
        table = table.replace("\n", "\n|" + "|".join("-" * (w + 2) for w in widths) + "|\n", 1)
        with open(os.path.join(workdir, "ab.json"), "w") as fh:
            json.dump({"options": o.to_dict(), "results": results}, fh, indent=2)
        with open(os.path.join(workdir, "ab.md"), "w") as fh:
            fh.write(table + "\n")
    print(table)
    print(f"\nresults: {folder.final}/ab.json, ab.md")
    return results
