"""``OFTConfig``: orthogonal fine-tuning (Qiu et al., 2023), peft's field names and JSON layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from ...config import ConfigError, PeftConfig, PeftType, check_number

_BIAS_CHOICES = ("none", "all", "oft_only")


@dataclass
class OFTConfig(PeftConfig):
    """OFT: each targeted layer's input is rotated by a learned block-diagonal orthogonal matrix before the
    frozen weight, ``y = W (R x) + b`` with ``R = diag(R_1, ..., R_r)``, each ``R_i`` the Cayley transform
    of a skew-symmetric ``(b, b)`` block (``b = oft_block_size``). Merged, ``W' = W R^T``.

    Args:
        r: Number of blocks per layer; give either ``r`` or ``oft_block_size`` (the other is 0), since
            ``r * oft_block_size`` is the layer's input size (``in * k * k`` for a ``k x k`` Conv2d). A value
            that does not divide that size is moved to the nearest one that does, with a warning (as peft).
        oft_block_size: Size ``b`` of each block (default 32; set it to 0 when giving ``r``).
        module_dropout: During training, this fraction of a layer's blocks is replaced by the identity
            (multiplicative dropout), chosen at random per forward call. (peft 0.21 creates this dropout but
            never applies it: training with it differs from peft's; evaluation and checkpoints do not.)
        target_modules: Modules to adapt (list = name or ``.``-suffix, str = full regex, ``"all-linear"``).
        exclude_modules: Modules to skip.
        layers_to_transform: Only adapt layers with these indices.
        layers_pattern: Name(s) of the layer container used to find the index.
        fan_in_fan_out: peft's field; OFT adapts ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` (no GPT-2
            ``Conv1D``), so it must be False.
        bias: Which biases train and are saved with the adapter: ``"none"``, ``"all"`` (every bias in the model)
            or ``"oft_only"`` (the base biases of the adapted layers, keyed ``<module>.base_layer.bias``). The
            rotation acts on the input, so a trained bias is added after the rotated product, as in peft.
        modules_to_save: Modules trained in full and saved with the adapter.
        init_weights: ``True``: zero skew parameters, ``R = I`` (the model starts as the base); ``False``:
            ``N(0, 0.1)`` (tests).
        coft: Constrained OFT: before each use, every block's skew matrix ``Q`` is pulled back into the
            ball ``||Q||_F <= eps / sqrt(n_blocks)`` (written into the parameter, as peft does).
        eps: COFT's radius (only used with ``coft``).
        block_share: One block shared by all ``r`` positions (``oft_R`` has one row).
        use_cayley_neumann: Replace the exact Cayley transform (a linear solve) by a truncated Neumann
            series of ``num_cayley_neumann_terms`` terms (see :mod:`.functional` for both formulas).
        num_cayley_neumann_terms: Terms of that series (>= 1).
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    peft_type: ClassVar[PeftType] = PeftType.OFT

    def validate(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        for name in ("r", "oft_block_size"):
            check_number(name, getattr(self, name), low=0, low_inclusive=True, integer=True)
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ConfigError(f"give exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) as "
                              "non-zero: r x oft_block_size is the layer's input size, so the other is derived")
        check_number("module_dropout", self.module_dropout, low=0, high=1, low_inclusive=True)
        check_number("eps", self.eps, low=0)
        check_number("num_cayley_neumann_terms", self.num_cayley_neumann_terms, low=1, low_inclusive=True,
                     integer=True)
        for name in ("init_weights", "coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.bias not in _BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if self.fan_in_fan_out:
            raise ConfigError("fan_in_fan_out=True: OFT adapts nn.Linear, nn.Conv2d and nn.Embedding only "
                              "(no Conv1D with (in, out) weights), as in peft")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not: give both")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OFTConfig":
        # peft < 0.14 wrote OFT configs without oft_block_size, for a different parameterisation whose
        # tensors would load into the wrong shapes or, worse, the right ones with another meaning.
        if cls is OFTConfig and "oft_block_size" not in data:
            raise ConfigError("this OFT config has no 'oft_block_size': it was written by peft < 0.14, whose OFT "
                              "weights mean something else; retrain the adapter with a current version")
        return super().from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in ("target_modules", "exclude_modules"):
            if isinstance(out[name], list):
                out[name] = sorted(set(out[name]))
        return out
