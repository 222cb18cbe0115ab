"""Run reports: ``metrics.json`` contents, the training plot (PNG) and the printed summary table."""

from __future__ import annotations

import glob
import os
import sys
from typing import Optional

from .options import RunOptions


def file_bytes(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0


def model_weight_bytes(model_path: str) -> int:
    """Size of a transformers folder's weight files (safetensors, else .bin)."""
    files = glob.glob(os.path.join(model_path, "*.safetensors")) or glob.glob(os.path.join(model_path, "*.bin"))
    return sum(file_bytes(f) for f in files)


def peak_memory_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss``: KiB on Linux, bytes on macOS); 0 where
    the platform has no ``resource`` module."""
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _memory_line(m: dict) -> str:
    base = f"{m['quantize']} (bitsandbytes)" if m.get("quantize") else "float32"
    return f"peak memory: {human_bytes(m['peak_memory_bytes'])} (base model {base})"


def _final(result) -> dict:
    last = result.history[-1] if result.history else {}
    return {k: v for k, v in last.items() if k.startswith("eval_")}


def _run_entry(result) -> Optional[dict]:
    if result is None:
        return None
    return {"name": result.name, "final": _final(result), "history": result.history,
            "train_seconds": round(result.seconds, 2), "trainable_params": result.trainable_params}


def metrics(o: RunOptions, data, base_path: str, adapter_dir: str, baseline, result) -> dict:
    adapter = _run_entry(result)
    adapter["file_bytes"] = file_bytes(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return {
        "task": o.task, "method": o.method, "model": base_path,
        "dataset": {"train": len(data.train), "test": len(data.test), "labels": data.labels,
                    "source": o.data or "bundled support-intents"},
        "baseline": _run_entry(baseline),
        "adapter": adapter,
        "full_model": {"params": result.total_params, "file_bytes": model_weight_bytes(base_path)},
        "quantize": o.quantize, "peak_memory_bytes": peak_memory_bytes(),
    }


def plot(path: str, results: list, task: str) -> None:
    """Training loss and the evaluation metric per epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "eval_accuracy" if task == "seq-cls" else "eval_perplexity"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for result in results:
        epochs = [row["epoch"] for row in result.history]
        left.plot(epochs, [row.get("train_loss") for row in result.history], marker="o", label=result.name)
        right.plot(epochs, [row.get(metric) for row in result.history], marker="o", label=result.name)
    left.set(title="training loss", xlabel="epoch", ylabel="loss")
    right.set(title=metric.replace("eval_", "held-out "), xlabel="epoch", ylabel=metric.replace("eval_", ""))
    save_per_epoch_figure(fig, (left, right), path)


def save_per_epoch_figure(fig, axes, path: str) -> None:
    """Whole epochs on the x axes, a light grid and a legend on each of ``axes``; ``fig`` written to ``path``
    and closed."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def summary(m: dict, folder: str) -> str:
    metric = "eval_accuracy" if m["task"] == "seq-cls" else "eval_perplexity"
    label = "accuracy" if m["task"] == "seq-cls" else "perplexity"
    rows = [("run", f"held-out {label}", "trainable params", "file size", "train time")]
    if m["baseline"]:
        b = m["baseline"]
        rows.append(("head-only baseline", f"{b['final'].get(metric, float('nan')):.3f}",
                     f"{b['trainable_params']:,}", "-", f"{b['train_seconds']:.1f}s"))
    a = m["adapter"]
    rows.append((f"{m['method']} adapter", f"{a['final'].get(metric, float('nan')):.3f}", f"{a['trainable_params']:,}",
                 human_bytes(a["file_bytes"]), f"{a['train_seconds']:.1f}s"))
    full = m["full_model"]
    rows.append(("full model (reference)", "-", f"{full['params']:,}", human_bytes(full["file_bytes"]), "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    share = 100 * a["trainable_params"] / max(full["params"], 1)
    lines.append(f"\nadapter: {share:.2f}% of the parameters, {human_bytes(a['file_bytes'])} on disk")
    lines.append(_memory_line(m))
    lines.append(f"run folder: {folder} (adapter/, metrics.json, training.png, config.json)")
    return "\n".join(lines)


def chat_metrics(o: RunOptions, data, base_path: str, adapter_dir: str, result, scores: dict,
                 answer_seconds: float) -> dict:
    """``metrics.json`` of a chat run: the untuned model and the adapter, each with held-out exact match,
    ``names_answer`` (see :func:`.chat.score_answers`) and answer perplexity.

    Args:
        result: the adapter's ``FitResult`` (its ``before`` holds the untuned model's evaluation).
        scores: ``{"untuned": ..., "adapter": ...}`` from :func:`.chat.score_answers`.
        answer_seconds: time the untuned model took to answer the held-out prompts.
    """
    def perplexity(evaluation: dict) -> Optional[float]:
        return evaluation.get("eval_perplexity")

    adapter = _run_entry(result)
    adapter["final"].update({f"eval_{k}": v for k, v in scores["adapter"].items()})
    adapter["file_bytes"] = file_bytes(os.path.join(adapter_dir, "adapter_model.safetensors"))
    adapter["steps"] = result.steps
    untuned = {"name": "untuned", "trainable_params": 0, "answer_seconds": round(answer_seconds, 2),
               "final": {"eval_perplexity": perplexity(result.before),
                         **{f"eval_{k}": v for k, v in scores["untuned"].items()}}}
    return {
        "task": o.task, "method": o.method, "model": base_path, "chat": True,
        "dataset": {"train": len(data.train), "test": len(data.test), "labels": [],
                    "source": o.data or "bundled support-intents (chat)"},
        "baseline": untuned,
        "adapter": adapter,
        "full_model": {"params": result.total_params, "file_bytes": model_weight_bytes(base_path)},
        "quantize": o.quantize, "peak_memory_bytes": peak_memory_bytes(),
    }


def chat_summary(m: dict, folder: str) -> str:
    """The printed table of a chat run: untuned model, adapter, full model."""
    rows = [("run", "held-out exact match", "names the answer", "answer perplexity", "trainable params",
             "file size", "train time")]
    for entry, name, size, seconds in ((m["baseline"], "untuned model", "-", "-"),
                                       (m["adapter"], f"{m['method']} adapter", human_bytes(m["adapter"]["file_bytes"]),
                                        f"{m['adapter']['train_seconds']:.1f}s")):
        final = entry["final"]
        ppl = final.get("eval_perplexity")
        rows.append((name, f"{final['eval_exact_match']:.3f}", f"{final['eval_names_answer']:.3f}",
                     "-" if ppl is None else f"{ppl:.3f}", f"{entry['trainable_params']:,}", size, seconds))
    full = m["full_model"]
    rows.append(("full model (reference)", "-", "-", "-", f"{full['params']:,}", human_bytes(full["file_bytes"]), "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    share = 100 * m["adapter"]["trainable_params"] / max(full["params"], 1)
    lines.append(f"\nadapter: {share:.2f}% of the parameters, {human_bytes(m['adapter']['file_bytes'])} on disk")
    lines.append(_memory_line(m))
    lines.append(f"run folder: {folder} (adapter/, metrics.json, predictions.jsonl, training.png, config.json)")
    return "\n".join(lines)


def chat_plot(path: str, result, scores: dict) -> None:
    """Training loss per logged step, and held-out answer perplexity per epoch (epoch 0: untuned), with
    the exact match before and after in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if result.steps:
        left.plot([s for s, _ in result.steps], [l for _, l in result.steps], marker=".", label=result.name)
    epochs = [0] + [row["epoch"] for row in result.history]
    values = [result.before.get("eval_perplexity")] + [row.get("eval_perplexity") for row in result.history]
    right.plot(epochs, values, marker="o", label=result.name)
    left.set(title="training loss (answer tokens)", xlabel="step", ylabel="loss")
    right.set(title=f"held-out answer perplexity; exact match {scores['untuned']['exact_match']:.2f} -> "
                    f"{scores['adapter']['exact_match']:.2f}", xlabel="epoch (0: untuned)", ylabel="perplexity")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
