"""Reports of ``deltatune train --task image-cls``: ``metrics.json`` contents, the plot and the table.

The linear probe trains for many cheap epochs on cached features and the adapter for a few full ones,
so the plot draws the adapter per epoch and the probe's final accuracy as a level line.
"""

from __future__ import annotations

import os
from typing import Optional

from .report import file_bytes, human_bytes, model_weight_bytes, save_per_epoch_figure


def _entry(result) -> Optional[dict]:
    if result is None:
        return None
    final = {k: v for k, v in (result.history[-1] if result.history else {}).items() if k.startswith("eval_")}
    return {"name": result.name, "final": final, "history": result.history, "epochs": len(result.history),
            "train_seconds": round(result.seconds, 2), "trainable_params": result.trainable_params}


def image_metrics(o, data, size: int, base_path: str, adapter_dir: str, probe, result) -> dict:
    """``metrics.json``: dataset, linear probe, adapter (with its file size), full model, warnings."""
    adapter = _entry(result)
    adapter["file_bytes"] = file_bytes(os.path.join(adapter_dir, "adapter_model.safetensors"))
    warnings = []
    if probe is not None and adapter["final"]["eval_accuracy"] <= probe.history[-1]["eval_accuracy"]:
        warnings.append(f"the adapter's held-out accuracy ({adapter['final']['eval_accuracy']:.3f}) is not above "
                        f"the linear probe's ({probe.history[-1]['eval_accuracy']:.3f}): try more --epochs or "
                        f"another --lr (now {o.lr:g})")
    return {
        "task": o.task, "method": o.method, "model": base_path,
        "dataset": {"train": len(data.train), "test": len(data.test), "labels": data.labels,
                    "source": data.source, "image_size": size},
        "baseline": _entry(probe),
        "adapter": adapter,
        "full_model": {"params": result.total_params, "file_bytes": model_weight_bytes(base_path)},
        "warnings": warnings,
    }


def image_summary(m: dict, folder: str) -> str:
    """The printed table: linear probe, adapter, full model; then the adapter's share and the wall time."""
    rows = [("run", "held-out accuracy", "trainable params", "file size", "epochs", "train time")]
    if m["baseline"]:
        b = m["baseline"]
        rows.append(("linear probe (frozen backbone)", f"{b['final']['eval_accuracy']:.3f}",
                     f"{b['trainable_params']:,}", "-", str(b["epochs"]), f"{b['train_seconds']:.1f}s"))
    a = m["adapter"]
    rows.append((f"{m['method']} adapter + head", f"{a['final']['eval_accuracy']:.3f}", f"{a['trainable_params']:,}",
                 human_bytes(a["file_bytes"]), str(a["epochs"]), f"{a['train_seconds']:.1f}s"))
    full = m["full_model"]
    rows.append(("full model (reference)", "-", f"{full['params']:,}", human_bytes(full["file_bytes"]), "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    share = 100 * a["trainable_params"] / max(full["params"], 1)
    d = m["dataset"]
    lines.append(f"\n{d['train']} train / {d['test']} held-out images ({d['source']}) at {d['image_size']} pixels; "
                 f"adapter: {share:.2f}% of the parameters, {human_bytes(a['file_bytes'])} on disk; "
                 f"wall time {m.get('wall_seconds', 0):.0f}s")
    lines.append(f"run folder: {folder} (adapter/, metrics.json, training.png, config.json)")
    return "\n".join(lines)


def image_plot(path: str, probe, result) -> None:
    """Training loss and held-out accuracy per epoch of the adapter run; the probe's final as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in result.history]
    left.plot(epochs, [row["train_loss"] for row in result.history], marker="o", label=f"{result.name} (train)")
    left.plot(epochs, [row["eval_loss"] for row in result.history], marker="o", label=f"{result.name} (held-out)")
    right.plot(epochs, [row["eval_accuracy"] for row in result.history], marker="o", label=f"{result.name} + head")
    if probe is not None:
        final = probe.history[-1]
        left.axhline(final["eval_loss"], color="grey", linestyle="--", label=f"linear probe (held-out, {final['epoch']} epochs)")
        right.axhline(final["eval_accuracy"], color="grey", linestyle="--",
                      label=f"linear probe ({final['epoch']} epochs on cached features)")
    left.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    right.set(title="held-out accuracy", xlabel="epoch", ylabel="accuracy")
    save_per_epoch_figure(fig, (left, right), path)
