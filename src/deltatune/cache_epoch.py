"""A counter for caches of values derived from weights: it moves whenever weights may have changed
without their version counters noticing.

DoRA's cached row norms and the no-grad LoRA factors are keyed by the tensors' version counters, which
every in-place PyTorch op bumps, but fused optimizer kernels do not (``AdamW(fused=True)``, the default of
recent transformers ``Trainer``s, updates parameters with their version unchanged). So every optimizer
step (``torch.optim.Optimizer`` and its subclasses, as bitsandbytes' and most fused ones are) moves this
counter too, through a global post-step hook registered the first time a cache asks for it.
"""

from __future__ import annotations

from torch.optim.optimizer import register_optimizer_step_post_hook

_epoch = 0
_hook = None


def current() -> int:
    """The counter's value; a cache built at one value is stale at another."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_bump)
    return _epoch


def _bump(*_args) -> None:
    global _epoch
    _epoch += 1
