"""``TrainableTokensConfig``: train only some rows of an embedding, peft's field names and JSON layout."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from ...config import ConfigError, PeftConfig, PeftType


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Trainable tokens: the embedding rows of ``token_indices`` (e.g. tokens just added to a tokenizer)
    train, every other row stays exactly as it is.

    Each listed row ``i`` of the embedding ``E: (V, D)`` is replaced by a trainable row ``d_i: (D,)``:
    ``E'[i] = d_i`` for ``i`` in ``token_indices``, ``E'[j] = E[j]`` otherwise. An output head that shares
    ``E`` (tied word embeddings) computes its logits with ``E'`` too, with the same ``d_i``.

    Args:
        token_indices: The token ids whose rows train (distinct, ``0 <= i < V``).
        target_modules: The embedding module(s) to adapt (list = name or ``.``-suffix, str = full regex).
            None: the model's input embedding (``get_input_embeddings()``), resolved on a copy of this config
            when the adapter is added (the copy, with the name, is what gets saved, as in peft).
        init_weights: ``True``: each ``d_i`` starts as ``E[i]`` (the model starts as the base); ``False``:
            standard normal values (tests).
    """

    token_indices: list[int] = field(default_factory=list)
    target_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True

    peft_type: ClassVar[PeftType] = PeftType.TRAINABLE_TOKENS
    # The LoRA-style targeting code reads these; peft's TrainableTokensConfig has none of them.
    exclude_modules: ClassVar[None] = None
    layers_to_transform: ClassVar[None] = None
    layers_pattern: ClassVar[None] = None
    modules_to_save: ClassVar[None] = None

    def validate(self) -> None:
        # (a config is never changed after construction: normalise the containers here, once)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.token_indices, (set, tuple, range)):
            self.token_indices = list(self.token_indices)
        if not isinstance(self.token_indices, list):
            raise ConfigError(f"token_indices must be a list of token ids, got {self.token_indices!r}")
        bad = [i for i in self.token_indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad:
            raise ConfigError(f"token_indices must be non-negative integers; got {bad[:5]}")
        repeated = sorted(i for i, n in Counter(self.token_indices).items() if n > 1)
        if repeated:  # (peft would copy whichever duplicate comes last: which one trains is undefined)
            raise ConfigError(f"token_indices lists token ids more than once: {repeated[:5]} "
                              "(each row has one trainable value)")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True or False, got {self.init_weights!r}")

    def replace(self, **changes) -> "TrainableTokensConfig":
        """A validated copy with some fields changed; ``modules_to_save`` (which a task wrapper asks for to
        train its head, e.g. ``SEQ_CLS``) is refused by name: this method has no such field, in peft either."""
        if "modules_to_save" in changes:
            raise ConfigError(f"TrainableTokensConfig has no modules_to_save (nor has peft's), so task_type="
                              f"{getattr(self.task_type, 'value', self.task_type)!r}, whose head must train, cannot "
                              "use it; leave task_type unset, or use LoraConfig(trainable_token_indices=...)")
        return super().replace(**changes)
