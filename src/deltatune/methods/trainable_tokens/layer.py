"""Trainable-token layers: an embedding (or a linear output head tied to one) with a few rows trainable.

One adapter's rows live in a :class:`TokenRows` module. A head whose weight is the embedding's weight
(tied word embeddings) holds *the same* :class:`TokenRows` object as the embedding's layer, so both
compute with the same trainable rows, an optimizer sees them once, and a checkpoint lists them under both
module names with equal values (as peft writes them).

The layer is usable outside this method: LoRA's ``trainable_token_indices`` wraps an embedding in a
subclass with its own ``checkpoint_kind`` (see :func:`deltatune.methods.trainable_tokens.add_token_rows`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ... import adapter_state
from ...adapter_layer import read_weight
from ..lora.layer import adapter_dtype
from . import functional as TF


class TokenRows(nn.Module):
    """One adapter's rows (``k`` listed tokens of a ``(V, D)`` weight).

    Attributes:
        token_indices: The listed token ids, in order (``idx``).
        trainable_tokens_delta: ``R: (k, D)``, the trainable rows (peft's name: they *replace* the rows,
            they are not added to them).
        trainable_tokens_original: ``W[idx]: (k, D)``, the rows as they were (what an unmerge writes back,
            bit for bit); a buffer that is not saved.
        index: ``idx`` as a ``(k,)`` long tensor; ``slots``: :func:`~.functional.slot_table` ``(V,)``.
    """

    def __init__(self, token_indices: Sequence[int], original: Tensor, values: Tensor, vocab_size: int,
                 padding_idx: Optional[int] = None):
        super().__init__()
        self.token_indices = list(token_indices)
        # the slot of an embedding's padding row, if listed: that row gets no gradient, as in the base
        self.padding_slot = self.token_indices.index(padding_idx) if padding_idx in self.token_indices else None
        self.trainable_tokens_delta = nn.Parameter(values)
        device = original.device
        self.register_buffer("trainable_tokens_original", original, persistent=False)
        self.register_buffer("index", torch.as_tensor(self.token_indices, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("slots", TF.slot_table(self.token_indices, vocab_size, device), persistent=False)

    def extra_repr(self) -> str:
        return f"tokens={len(self.token_indices)}, dim={self.trainable_tokens_delta.shape[-1]}"


@adapter_state.peft_surface
class TrainableTokensLayer(nn.Module):
    """An ``nn.Embedding`` (or ``nn.Linear`` output head) whose listed rows come from trainable tensors.

    ``y = embed(x)`` with ``y[p] = R[slot(x[p])]`` for listed ids (embedding), or ``y = x W'^T + b``
    (head), ``W'`` being the weight with rows ``idx`` replaced by ``R``. Several active adapters must list
    disjoint ids (each replaces its own rows; which of two would win is undefined, so peft refuses it too).
    """

    checkpoint_kind = "trainable_tokens"

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise TypeError(f"trainable tokens need an nn.Embedding (or an nn.Linear output head), "
                            f"got {type(base_layer).__name__}")
        adapter_state.init(self, base_layer)
        self._tied: set[str] = set()  # adapters whose rows another layer (the embedding) owns
        # [the embedding layer] a tied head follows (a list: not a submodule, so not saved or counted twice)
        self._follows: list = []
        # adapter name -> (token ids, init_weights, autocast_adapter_dtype, device) of a head whose rows wait
        # for the injection's ``attach`` hook: tied to the embedding sharing its weight, else its own
        self._pending: dict = {}
        self._embedding = isinstance(base_layer, nn.Embedding)
        if self._embedding:
            self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    weight = property(adapter_state.base_weight)
    set_active = adapter_state.set_active
    set_disabled = adapter_state.set_disabled
    _refresh = adapter_state.refresh

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter that is not merged (a tied head's: only this layer's reference to the rows)."""
        adapter_state.delete_adapter(self, name)
        self._tied.discard(name)

    @property
    def vocab_size(self) -> int:
        """``V``: rows of the stored weight (embeddings' ``num_embeddings``, a head's ``out_features``)."""
        return self.in_features if self._embedding else self.out_features

    # ------------------------------------------------------------------ bookkeeping
    def add_adapter(self, name: str, token_indices: Sequence[int], init_weights: bool = True,
                    autocast_adapter_dtype: bool = True, device=None, tied: Optional[TokenRows] = None) -> None:
        """Create adapter ``name`` over rows ``token_indices``, or, with ``tied``, use that adapter's rows
        (another layer's over the same weight: a tied output head follows the embedding).

        ``R`` starts as ``W[idx]`` (``init_weights``) or standard normal; ``W[idx]`` is kept to unmerge.
        ``device="meta"``: ``R`` is created empty, to be loaded (``W[idx]`` is still read).
        Raises ValueError (the layer unchanged) for a name it has, no ids, ids ``>= V``, or a ``tied`` of
        other ids or width.
        """
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        ids = list(token_indices)
        if not ids:
            raise ValueError("token_indices is empty: no row would train")
        out_of_range = [i for i in ids if not 0 <= i < self.vocab_size]
        if out_of_range:
            raise ValueError(f"token_indices {out_of_range[:5]} are out of range for a weight of "
                             f"{self.vocab_size} rows")
        weight = read_weight(self.base_layer)
        if tied is not None:
            if tied.token_indices != ids or tied.trainable_tokens_delta.shape[-1] != weight.shape[1]:
                raise ValueError("the tied rows list other token ids or have another width than this layer")
            self.adapters[name] = tied
            self._tied.add(name)
            return
        with torch.no_grad():
            original = weight[torch.as_tensor(ids, dtype=torch.long, device=weight.device)].detach().clone()
        dtype = adapter_dtype(weight, autocast_adapter_dtype)
        if device == "meta":
            values = torch.empty(original.shape, dtype=dtype, device="meta")
        elif init_weights:
            values = original.to(dtype=dtype, copy=True)
        else:
            values = torch.randn(original.shape, dtype=dtype, device=original.device)
        padding_idx = self.base_layer.padding_idx if self._embedding else None
        self.adapters[name] = TokenRows(ids, original, values, self.vocab_size, padding_idx)

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        return {"trainable_tokens_delta": self.adapters[name].trainable_tokens_delta}

    def is_tied(self, name: str) -> bool:
        """Whether adapter ``name``'s rows are another layer's (this is a head tied to an embedding)."""
        return name in self._tied and name in self.adapters

    def tied_to(self, other: "TrainableTokensLayer", name: str) -> bool:
        """Whether adapter ``name`` of this layer is the very rows of ``other``'s (a tied pair)."""
        return name in self.adapters and name in other.adapters and self.adapters[name] is other.adapters[name]

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self._run:
            return out
        if len(self._run) > 1:
            self._check_disjoint([n for n in self.active if n not in self.merged_adapters])
        base = self.base_layer
        for rows in self._run:
            R = rows.trainable_tokens_delta
            if self._embedding:
                if base.max_norm is not None:
                    R = TF.renorm_rows(R, base.max_norm, base.norm_type)
                out = TF.embed_with_rows(out, x, rows.slots, R, rows.padding_slot, _embed_scale(base))
            else:
                out = TF.head_with_rows(out, x, rows.index, R, base.bias)
        return out

    def _check_disjoint(self, names: Sequence[str]) -> None:
        """ValueError if two of adapters ``names`` list the same token id (peft's rule and message)."""
        seen: set[int] = set()
        for name in dict.fromkeys(names):
            ids = set(self.adapters[name].token_indices)
            if seen & ids:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in "
                                 "undefined merging behavior. Only disjunct token indices are currently supported.")
            seen |= ids

    # ------------------------------------------------------------------ merging
    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """Write each adapter's rows into the base weight: ``W[idx] <- R``. Adapters merged now and before
        must list disjoint ids (ValueError before anything is written)."""
        wanted = [n for n in (self.active if names is None else names) if n in self.adapters]
        self._check_disjoint(self.merged_adapters + wanted)
        adapter_state.merge_adapters(self, names, safe, self._merged_weight)

    def unmerge(self) -> None:
        """Write the kept rows back, last merged first: ``W[idx] <- W_before[idx]``, bit for bit."""
        adapter_state.unmerge_adapters(self, self._unmerged_weight)

    def _merged_weight(self, name: str, weight: Tensor) -> Tensor:
        rows = self.adapters[name]
        return TF.replace_rows(weight, rows.index, rows.trainable_tokens_delta.detach())

    def _unmerged_weight(self, name: str, weight: Tensor) -> Tensor:
        rows = self.adapters[name]
        return TF.replace_rows(weight, rows.index, rows.trainable_tokens_original)


def embedding_of(layer: TrainableTokensLayer) -> Optional[TrainableTokensLayer]:
    """The embedding layer a linear head's layer follows (set when the head was tied to it; kept through
    merges, which give tied layers copies of their weight, :func:`deltatune.injection.own_base_weights`);
    None for an embedding, an untied head, or a head not tied yet."""
    if layer._embedding or not layer._follows:
        return None
    return layer._follows[0]


def _embed_scale(embedding: nn.Module) -> Optional[Tensor]:
    """The scalar some embeddings multiply their output by (Gemma's ``embed_scale``), as a tensor; None if
    there is none."""
    scale = getattr(embedding, "embed_scale", None)
    if scale is None:
        return None
    if isinstance(scale, (int, float)):
        return torch.tensor(scale, dtype=embedding.weight.dtype, device=embedding.weight.device)
    if isinstance(scale, Tensor) and scale.numel() == 1:
        return scale
    return None


def wrap_module(module: nn.Module) -> TrainableTokensLayer:
    """A :class:`TrainableTokensLayer` around an ``nn.Embedding`` or ``nn.Linear`` (TypeError otherwise)."""
    return TrainableTokensLayer(module)
