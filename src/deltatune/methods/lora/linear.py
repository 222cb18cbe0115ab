"""LoRA on ``nn.Linear`` and transformers' ``Conv1D``: the routes of one forward call, chosen once at the top.

- **general**: any base (quantized, hooked, subclassed, extra arguments) and ``torch.compile``: the base
  module's output, then each adapter applied by its variant (:meth:`LoraLayer._apply_run`);
- **no-grad** (plain ``nn.Linear``): cached factors in the layout the small matmuls run fastest in
  (:mod:`.inference`);
- **training** (plain ``nn.Linear``, the dtypes agree or autocast is on): the first adapter and the base in
  one autograd node (:func:`~.functional.lora_linear`), the others through the general route.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from ...adapter_layer import logical_shape
from . import functional as LF
from . import inference, mixed
from .layer import LoraAdapter, LoraLayer

# One cheap call when no autocast is on anywhere (the usual case); the per-device check costs 5x more.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes matmuls in on ``x``'s device, or None when autocast is off there."""
    if not (_any_autocast() and torch.is_autocast_enabled(x.device.type)):
        return None
    return torch.get_autocast_dtype(x.device.type)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` or transformers' ``Conv1D`` (``fan_in_fan_out``: weight stored ``(in, out)``).

    ``y = base(x) + sum_a s_a * B_a A_a drop(x)``, ``x: (..., in)`` -> ``y: (..., out)``; DoRA adapters
    rescale instead (see :mod:`.variants`). Under autocast the adapter runs in autocast's dtype, as the base
    does; otherwise in the adapter's own dtype (float32 for half-precision bases).
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self._weight_out_dim = 1 if fan_in_fan_out else 0
        self.out_features, self.in_features = logical_shape(base_layer, fan_in_fan_out)[:2]

    def _init_from_base(self, adapter: LoraAdapter, mode: str) -> None:
        """PiSSA / OLoRA: factors from the base weight; the residual ``W - s B A`` replaces the base."""
        weight = self._read_weight()
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"init_lora_weights={mode!r} needs a float base weight, got {weight.dtype}")
        rows = (weight.t() if self.fan_in_fan_out else weight).float()  # (out, in)
        if mode == "olora":
            A, B = LF.olora_factors(rows, adapter.r)
        else:
            niter = int(mode[len("pissa_niter_"):]) if mode.startswith("pissa_niter_") else None
            A, B = LF.pissa_factors(rows, adapter.r, adapter.scaling, niter)
        residual = rows - adapter.scaling * (B @ A)
        with torch.no_grad():
            adapter.lora_A.copy_(A)
            adapter.lora_B.copy_(B)
            self._write_weight((residual.t() if self.fan_in_fan_out else residual).to(weight.dtype))
        adapter.wrote_residual = True  # see undo_adapter

    def _shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def delta_weight(self, name):
        ad = self.adapters[name]
        return LF.linear_delta_weight(ad.lora_A.float(), ad.lora_B.float(), ad.scaling, self.fan_in_fan_out)

    _mixed_gathers = True  # (see mixed._gathers_pay)

    def _mixed_layout(self, A, B):
        return A.t().contiguous(), B.t().contiguous()  # (in, sum r), (sum r, out): x @ A_t, h @ B_t

    def _down(self, x, A_t):
        return x @ A_t

    def _up(self, h, B_t):
        return h @ B_t

    def _delta(self, x: Tensor, ad: LoraAdapter) -> Tensor:
        A, B = ad.lora_A, ad.lora_B
        p = ad.dropout if self.training else 0.0
        if torch.compiler.is_compiling():  # (the compact-mask Function has data-dependent shapes)
            return LF.linear_delta(self._cast_input(x, A.dtype), A, B, ad.scaling, p, training=True)
        dtype = _autocast_dtype(x)
        if dtype is None:
            return LF.lora_delta(x if x.dtype == A.dtype else x.to(A.dtype), A, B, ad.scaling, p)
        with torch.autocast(x.device.type, enabled=False):  # what autocast would cast, cast once here
            return LF.lora_delta(x.to(dtype), A.to(dtype), B.to(dtype), ad.scaling, p)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        run, base = self._run, self._modules["base_layer"]  # (no nn.Module.__getattr__ in the hot path)
        if self.rows is not None:
            if (torch.is_grad_enabled() or args or kwargs or type(base) is not nn.Linear or not _runs_forward_only(base)
                    or torch.compiler.is_compiling() or x.dtype is not base.weight.dtype):
                return self._forward_rows(x, base(x, *args, **kwargs))
            return mixed.linear_no_grad(self, x, base.weight, base.bias, self.rows)
        if not run:
            return base(x, *args, **kwargs)
        if (args or kwargs or type(base) is not nn.Linear or not _runs_forward_only(base)
                or torch.compiler.is_compiling()):
            return self._apply_run(x, base(x, *args, **kwargs), run)
        # A plain nn.Linear: calling F.linear is what calling the module would do (no hooks, forward not
        # replaced), minus the module-call overhead, a large share of a decoded token's cost per layer.
        params = base._parameters
        weight, bias = params["weight"], params["bias"]
        if not torch.is_grad_enabled():
            return inference.forward(self, x, weight, bias, run)
        return self._fused(x, weight, bias, run)

    def _fused(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], run) -> Tensor:
        """The training route: the first adapter and the base in one autograd node (see LF.lora_linear), on
        a 2-D view of ``x`` (in place on a view would make autograd copy the output gradient: CopySlices)."""
        ad = run[0]
        if not ad.variant.fuses:
            return self._apply_run(x, F.linear(x, weight, bias), run)
        dtype = _autocast_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if dtype is None and not x.dtype == weight.dtype == ad.lora_A.dtype:
            # e.g. a half-precision base with float32 adapters: the adapter computes in its own dtype
            out = self._apply_run(x2, F.linear(x2, weight, bias), run)
            return out.view(*shape[:-1], out.shape[-1])
        p = ad.dropout if self.training else 0.0
        scale = ad.variant.row_scale(self, ad, dtype or x.dtype)
        if dtype is None:
            out = LF.lora_linear(x2, weight, bias, ad.lora_A, ad.lora_B, ad.scaling, p, scale)
        else:  # autocast: its casts done once here (each differentiable), the node itself in that dtype
            with torch.autocast(x.device.type, enabled=False):
                out = LF.lora_linear(x2.to(dtype), weight.to(dtype), _cast(bias, dtype), ad.lora_A.to(dtype),
                                     ad.lora_B.to(dtype), ad.scaling, p, _cast(scale, dtype))
        if len(run) > 1:
            out = self._apply_run(x2, out, run[1:])
        return out.view(*shape[:-1], out.shape[-1])


def _runs_forward_only(module: nn.Module) -> bool:
    """Whether calling ``module`` runs just its class's ``forward``: no hooks on it or global ones (as
    ``nn.Module.__call__`` checks), and no ``forward`` replaced on the instance (as accelerate does)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__
                or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks)
