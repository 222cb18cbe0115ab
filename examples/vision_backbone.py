"""LoRA on a DINOv2-style ViT backbone with a trainable classification head (the seeds' vision recipe).

The backbone is built from a config (random weights, no download) so this runs anywhere in seconds;
with a real checkpoint, replace ``Dinov2Model(config)`` by ``AutoModel.from_pretrained(...)``.

    python examples/vision_backbone.py

The task is synthetic: tell apart noise images with a red or a cyan colour cast. The adapter (attention +
MLP linears) and the head train; the backbone stays frozen.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from deltatune import LoraConfig, PeftModel, TaskType, get_peft_model


class BackboneClassifier(nn.Module):
    """ViT backbone -> CLS token -> linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 0]  # (N, hidden)
        return self.head(features)


def make_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    images[:, 0] += torch.where(labels[:, None, None] == 0, 0.5, -0.5)  # class = a red or cyan cast
    return images, labels


def build_model(seed: int = 0) -> BackboneClassifier:
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          image_size=32, patch_size=8)
    return BackboneClassifier(Dinov2Model(config), num_classes=2).eval()


def main(steps: int = 40) -> dict:
    g = torch.Generator().manual_seed(0)
    model = get_peft_model(build_model(), LoraConfig(
        task_type=TaskType.FEATURE_EXTRACTION, r=8, lora_alpha=16,
        target_modules=["query", "key", "value", "attention.output.dense", "fc1", "fc2"],
        modules_to_save=["head"]))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    test_x, test_y = make_batch(128, g)
    losses = []
    model.train()
    for _ in range(steps):
        x, y = make_batch(32, g)
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
        reloaded = PeftModel.from_pretrained(build_model(), folder)
        with torch.no_grad():
            same = (reloaded(test_x) - logits).abs().max().item()
        merged = reloaded.merge_and_unload()
        with torch.no_grad():
            merged_diff = (merged(test_x) - logits).abs().max().item()
    print(f"reloaded adapter max abs diff {same:.2e}; merged model max abs diff {merged_diff:.2e}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "accuracy": accuracy,
            "reload_diff": same, "merge_diff": merged_diff}


if __name__ == "__main__":
    main()
