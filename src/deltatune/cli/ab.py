"""``deltatune ab``: the seeds' A/B test: head-only baseline vs each adapter method, several seeds.

Every run uses the same data, split and base weights; only the seed changes (and, per method, the
settings its label brings: ``method_labels.LABEL_DEFAULTS``, named in the table). The table reports the
held-out metric as mean +- std over seeds, trainable parameters, adapter size, the mean time of one
optimizer step and the training time (which also holds the per-epoch evaluations).
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


def _arm_name(arm: str, settings: dict | None) -> str:
    """``vera (r 256, lr 0.01)``: the label and the settings it brought (see ``LABEL_DEFAULTS``)."""
    if not settings:
        return arm
    return f"{arm} ({', '.join(f'{k} {v:g}' for k, v in settings.items())})"


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
    results: dict[str, dict[str, list]] = {arm: {"metric": [], "seconds": [], "step_seconds": [], "bytes": [],
                                                 "trainable_params": []} for arm in arms}
    folder = RunFolder(o.output or os.path.join("runs", f"ab-{time.strftime('%Y%m%d-%H%M%S')}"), o.overwrite)
    with folder as workdir:
        for seed in o.seeds:
            for arm in arms:
                seeded = RunOptions(**{**o.to_dict(), **o.label_settings.get(arm, {}), "seed": seed})
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
                results[arm]["step_seconds"].append(fit.step_seconds)
                results[arm]["bytes"].append(size)
                results[arm]["trainable_params"].append(fit.trainable_params)
        if not is_main_process():
            return {}
        rows = [("arm", f"{metric.replace('eval_', '')} (mean +- std, {len(o.seeds)} seeds)", "trainable params",
                 "adapter size", "step time", "train time")]
        for arm, r in results.items():
            rows.append((_arm_name(arm, o.label_settings.get(arm)), _stat(r["metric"]),
                         f"{int(statistics.mean(r['trainable_params'])):,}",
                         human_bytes(int(statistics.mean(r["bytes"]))) if r["bytes"][0] else "-",
                         f"{1000 * statistics.mean(r['step_seconds']):.0f} ms",
                         f"{statistics.mean(r['seconds']):.1f}s"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        table = "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows)
        table = table.replace("\n", "\n|" + "|".join("-" * (w + 2) for w in widths) + "|\n", 1)
        with open(os.path.join(workdir, "ab.json"), "w") as fh:
            json.dump({"options": o.to_dict(), "results": results}, fh, indent=2)
        with open(os.path.join(workdir, "ab.md"), "w") as fh:
            fh.write(table + "\n")
    print(table)
    print(f"\nresults: {folder.final}/ab.json, ab.md")
    return results
