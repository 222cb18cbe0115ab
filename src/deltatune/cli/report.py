"""Run reports: ``metrics.json`` contents, the training plot (PNG) and the printed summary table."""

from __future__ import annotations

import glob
import os
from typing import Optional

from .options import RunOptions


def file_bytes(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0


def model_weight_bytes(model_path: str) -> int:
    """Size of a transformers folder's weight files (safetensors, else .bin)."""
    files = glob.glob(os.path.join(model_path, "*.safetensors")) or glob.glob(os.path.join(model_path, "*.bin"))
    return sum(file_bytes(f) for f in files)


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
    }


def plot(path: str, results: list, task: str) -> None:
    """Training loss and the evaluation metric per epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metric = "eval_accuracy" if task == "seq-cls" else "eval_perplexity"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for result in results:
        epochs = [row["epoch"] for row in result.history]
        left.plot(epochs, [row.get("train_loss") for row in result.history], marker="o", label=result.name)
        right.plot(epochs, [row.get(metric) for row in result.history], marker="o", label=result.name)
    left.set(title="training loss", xlabel="epoch", ylabel="loss")
    right.set(title=metric.replace("eval_", "held-out "), xlabel="epoch", ylabel=metric.replace("eval_", ""))
    for ax in (left, right):
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
    lines.append(f"run folder: {folder} (adapter/, metrics.json, training.png, config.json)")
    return "\n".join(lines)
