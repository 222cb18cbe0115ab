"""AdaLoRA's rank allocation and orthogonality penalty (pure bookkeeping over a model's SVD layers).

Importance of each parameter entry: ``I = |p * grad|``, smoothed ``Ibar = b1 Ibar + (1 - b1) I`` and its
uncertainty ``U = b2 U + (1 - b2) |I - Ibar|``; score ``S = Ibar * U``. A triplet ``i`` of a layer scores
``S(E_i) + mean_j S(A_ij) + mean_j S(B_ji)``. The total budget follows
``b(t) = b_T + (b_0 - b_T) (1 - (t - t_i) / (T - t_f - t_i))^3`` between the warm-up ``t_i`` and the
final ``t_f`` steps; triplets below the budget's threshold get ``E_i = 0``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...injection import adapter_layers
from .layer import SVDLinear


class RankAllocator:
    def __init__(self, config, adapter_name: str):
        self.config, self.name = config, adapter_name
        self.ipt: dict[str, Tensor] = {}
        self.unc: dict[str, Tensor] = {}

    def _layers(self, model: nn.Module):
        return [(n, l) for n, l in adapter_layers(model, SVDLinear) if self.name in l.adapters]

    def budget(self, step: int, n_layers: int) -> tuple[int, bool]:
        c = self.config
        start, end = c.init_r * n_layers, c.target_r * n_layers
        if step <= c.tinit:
            return start, False
        if step > c.total_step - c.tfinal:
            return end, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((start - end) * progress ** 3 + end), step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self, model: nn.Module) -> None:
        c = self.config
        for module, layer in self._layers(model):
            for role, p in layer.adapter_params(self.name).items():
                if p.grad is None:
                    continue
                key = f"{module}.{role}"
                ipt = (p * p.grad).abs()
                if key not in self.ipt:
                    self.ipt[key], self.unc[key] = torch.zeros_like(p), torch.zeros_like(p)
                self.ipt[key].mul_(c.beta1).add_(ipt, alpha=1 - c.beta1)
                self.unc[key].mul_(c.beta2).add_((ipt - self.ipt[key]).abs(), alpha=1 - c.beta2)

    def _scores(self, model: nn.Module) -> dict[str, Tensor]:
        out = {}
        for module, _ in self._layers(model):
            s = {role: self.ipt[f"{module}.{role}"] * self.unc[f"{module}.{role}"] for role in ("lora_A", "lora_B", "lora_E")
                 if f"{module}.{role}" in self.ipt}
            if len(s) == 3:
                out[module] = s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0)
        return out

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list]:
        scores = self._scores(model)
        if not scores:
            return {}
        flat = torch.cat(list(scores.values()))
        k = max(flat.numel() - budget, 0)
        threshold = torch.kthvalue(flat, k).values if k > 0 else flat.min() - 1
        return self.apply_pattern(model, {f"{m}.lora_E": (s > threshold).tolist() for m, s in scores.items()})

    @torch.no_grad()
    def apply_pattern(self, model: nn.Module, pattern: dict[str, list]) -> dict[str, list]:
        """Zero the pruned singular values and remember which triplets a save keeps."""
        for module, layer in self._layers(model):
            mask = pattern.get(f"{module}.lora_E")
            ad = layer.adapters[self.name]
            if mask is None or len(mask) != ad.lora_E.shape[0]:
                continue
            keep = torch.tensor(mask, dtype=torch.bool, device=ad.lora_E.device)
            ad.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            ad.keep = keep
        return pattern

    def step(self, model: nn.Module, global_step: int) -> Optional[dict[str, list]]:
        """One ``update_and_allocate``; returns a new rank pattern when ranks were reallocated."""
        c = self.config
        final = c.total_step - c.tfinal
        if global_step > final:
            self.apply_pattern(model, c.rank_pattern)  # keep the pruned triplets at zero
            return None
        self.update_importance(model)
        budget, mask_now = self.budget(global_step, len(self._layers(model)))
        if mask_now or global_step == final:
            pattern = self.mask_to_budget(model, budget)
            if global_step == final:
                self.ipt, self.unc = {}, {}
            return pattern
        return None


def orthogonality_penalty(model: nn.Module, adapter_name: str) -> Tensor:
    """Mean over A and B matrices of ``||P P^T - I||_F`` (rows of A, columns of B kept orthonormal)."""
    total, count = None, 0
    for _, layer in adapter_layers(model, SVDLinear):
        if adapter_name not in layer.adapters:
            continue
        ad = layer.adapters[adapter_name]
        for gram in (ad.lora_A @ ad.lora_A.t(), ad.lora_B.t() @ ad.lora_B):
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            term = torch.linalg.norm(gram - eye, "fro")
            total = term if total is None else total + term
            count += 1
    return total / count if count else torch.zeros(())


def update_and_allocate(peft_model, global_step: int) -> None:
    """``PeftModel.update_and_allocate``: step the active AdaLoRA adapter's :class:`RankAllocator` (one per
    adapter, kept on the model, rebuilt when the adapter's config is replaced) and record a new rank
    pattern in its config."""
    configs = peft_model.peft_config
    name = next((n for n in peft_model.active_adapters if configs[n].peft_type.value == "ADALORA"), None)
    if name is None:
        raise ValueError("update_and_allocate needs an active AdaLoRA adapter")
    allocators = peft_model.__dict__.setdefault("_allocators", {})
    if name not in allocators or allocators[name].config is not configs[name]:
        allocators[name] = RankAllocator(configs[name], name)
    pattern = allocators[name].step(peft_model.base_model.model, global_step)
    if pattern:
        configs[name] = configs[name].replace(rank_pattern=pattern)
        allocators[name].config = configs[name]
