"""``LoraConfig``: the LoRA hyper-parameters, with peft's field names and JSON layout."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from ...config import ConfigError, PeftConfig, PeftType, check_number
from ...targeting import pattern_value

_BIAS_CHOICES = ("none", "all", "lora_only")
_INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")


def _is_pissa_niter(value) -> bool:
    """``"pissa_niter_<N>"``: PiSSA through a randomized SVD with N subspace iterations."""
    return isinstance(value, str) and value.startswith("pissa_niter_") and value[12:].isdigit()


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation (Hu et al., 2021): ``W x + s * B A x`` with ``A: (r, in)``, ``B: (out, r)``.

    Args:
        r: Rank of the update (> 0).
        lora_alpha: Scale numerator (> 0); ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: Dropout probability on the adapter's input, in ``[0, 1)``.
        target_modules: Which modules get adapters. A list matches a module whose name equals an entry
            or ends with ``"." + entry``; a string is a regex that must match the whole name;
            ``"all-linear"`` picks every Linear/Conv1D except the output head.
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        layers_to_transform: Only adapt layers with these indices (an int or a list).
        layers_pattern: Name(s) of the layer container (e.g. ``"layers"``, ``"h"``) used to find the
            index; by default common names are tried.
        rank_pattern: ``{regex: r}`` overrides of ``r`` for modules whose name ends with a match.
        alpha_pattern: ``{regex: alpha}`` overrides of ``lora_alpha``, matched the same way.
        bias: Which biases train: ``"none"``, ``"all"`` (every bias in the model) or ``"lora_only"``
            (biases of adapted layers).
        use_rslora: Rank-stabilised scaling ``lora_alpha / sqrt(r)`` (Kalajdzievski, 2023).
        modules_to_save: Modules (by name suffix) that are copied and trained in full, e.g. a new head.
        init_lora_weights: ``True`` (B = 0, A Kaiming-uniform: the model starts as the base),
            ``"gaussian"`` (B = 0, A ~ N(0, 1/r)), ``False`` (both random, for tests), or from the base
            weight with the residual written back into the base: ``"pissa"`` (SVD), ``"pissa_niter_<N>"``
            (randomized SVD, N iterations) or ``"olora"`` (QR). Save such adapters with
            ``path_initial_model_for_weight_conversion`` to share them as plain LoRA.
        fan_in_fan_out: The base weight is stored ``(in, out)`` (GPT-2's ``Conv1D``); set
            automatically for Conv1D layers.
        use_dora: Weight-decomposed LoRA (DoRA): a learned magnitude per output row on top of the
            LoRA direction update; Linear and Conv1D layers.
        layer_replication: ``[[start, end), ...]`` ranges of layers to stack, e.g. ``[[0, 4], [2, 5]]``
            gives layers 0,1,2,3,2,3,4; repeated layers share base weights and get their own adapters.
        target_parameters: Parameters (by name suffix, e.g. ``"mlp.experts.gate_up_proj"``) to adapt directly:
            2-D weights or 3-D mixture-of-experts tensors ``(experts, out, in)``, one rank-r pair per expert
            (peft's layout); no dropout, DoRA or lora_bias there (as in peft).
        trainable_token_indices: Rows of embeddings that train in full beside the adapter (e.g. new chat
            tokens): a list of token ids for the input embedding, or ``{embedding name: ids}``; output
            heads tied to the embedding follow; saved as peft saves them.
        lora_bias: A trainable bias on ``lora_B`` (zero at init): ``y = W x + b + s (B A x + b_B)``; merging
            adds ``s b_B`` to the base bias (layers without one cannot merge it). Not with DoRA or embeddings.
    """

    r: int = 8
    lora_alpha: Union[int, float] = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, Union[int, float]] = field(default_factory=dict)
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    fan_in_fan_out: bool = False
    use_dora: bool = False
    layer_replication: Optional[list] = None
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None

    peft_type: ClassVar[PeftType] = PeftType.LORA
    compat_fields: ClassVar[dict] = {
        "alora_invocation_tokens": None,
        "arrow_config": None,
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "kasa_config": None,
        "loftq_config": {},
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "monteclora_config": None,
        "qalora_group_size": 16,
        "use_bdlora": None,
        "use_qalora": False,
        "velora_config": None,
    }

    def validate(self) -> None:
        check_number("r", self.r, low=0, integer=True)
        check_number("lora_alpha", self.lora_alpha, low=0)
        check_number("lora_dropout", self.lora_dropout, low=0, high=1, low_inclusive=True)
        for field_name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, field_name), dict):
                raise ConfigError(f"{field_name} must be a dict of module name pattern -> value, got "
                                  f"{getattr(self, field_name)!r}")
        for key, value in self.rank_pattern.items():
            check_number(f"rank_pattern[{key!r}]", value, low=0, integer=True)
        for key, value in self.alpha_pattern.items():
            check_number(f"alpha_pattern[{key!r}]", value, low=0)
        if self.bias not in _BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if self.init_lora_weights not in _INIT_CHOICES and not _is_pissa_niter(self.init_lora_weights):
            raise ConfigError(
                f"init_lora_weights must be one of {_INIT_CHOICES} or 'pissa_niter_<N>', got {self.init_lora_weights!r}"
            )
        if self.use_dora and self.init_lora_weights in ("pissa", "olora") or (
                self.use_dora and _is_pissa_niter(self.init_lora_weights)):
            raise ConfigError("use_dora=True cannot be combined with PiSSA/OLoRA initialisation")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, list) and not all(isinstance(t, str) for t in self.target_modules):
            raise ConfigError(f"target_modules entries must be strings, got {self.target_modules!r}")
        if self.layers_to_transform is not None and self.layers_pattern is not None and not self.layers_pattern:
            raise ConfigError("layers_pattern must not be empty when layers_to_transform is set")
        if self.layer_replication is not None and not (
                isinstance(self.layer_replication, list)
                and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in self.layer_replication)):
            raise ConfigError(f"layer_replication must be a list of [start, end] pairs, got {self.layer_replication!r}")
        if (self.layer_replication and isinstance(self.init_lora_weights, str)
                and self.init_lora_weights.startswith(("pissa", "olora"))):
            order = [i for start, end in self.layer_replication if isinstance(start, int) and isinstance(end, int)
                     for i in range(start, end)]
            repeated = sorted({i for i in order if order.count(i) > 1})
            if repeated:
                raise ConfigError(
                    f"init_lora_weights={self.init_lora_weights!r} writes the residual W - s B A into each adapted "
                    f"base weight, but layer_replication={self.layer_replication!r} makes positions share the "
                    f"weights of layers {repeated}: the second position would be initialised from the first one's "
                    "residual. Use another init_lora_weights with layer_replication.")
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias=True cannot be combined with use_dora=True (as in peft)")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(f"lora_bias=True needs init_lora_weights=True or False (as in peft), "
                              f"got {self.init_lora_weights!r}")

    # ------------------------------------------------------------------ per-module hyper-parameters
    def rank_for(self, module_name: str) -> int:
        """``r`` for one module: the first ``rank_pattern`` key matching its name, else ``r``."""
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        """``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) for one module."""
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(self.target_modules, list):
            out["target_modules"] = sorted(set(self.target_modules))
        return out


@dataclass
class DoRAConfig(LoraConfig):
    """Convenience spelling from the seeds: a :class:`LoraConfig` with ``use_dora=True``.

    It saves as a plain LoRA config (``peft_type: LORA``, ``use_dora: true``), exactly as peft writes it.
    """

    use_dora: bool = True
