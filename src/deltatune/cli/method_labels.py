"""The adapter methods ``deltatune train``/``ab`` offer, by command-line label, and the config each builds.

This is the command line's own table, not the registry's: a label is a recipe over the run options
(``dora`` is LoRA with ``use_dora``; ``ia3`` picks BERT's keys, values and feed-forward outputs when no
``--target`` is given), which a method's registration has no business knowing. Adding a label here is
all it takes for ``--method``/``--methods`` to accept it.
"""

from __future__ import annotations

from typing import Callable

from ..config import PeftConfig
from ..methods.ia3 import IA3Config
from ..methods.loha import LoHaConfig
from ..methods.lokr import LoKrConfig
from ..methods.lora import LoraConfig

#: The ``TaskType`` of each ``--task``.
TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def _lora(o, base_path: str, use_dora: bool = False) -> PeftConfig:
    return LoraConfig(task_type=TASK_TYPES[o.task], r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout,
                      target_modules=o.targets(), base_model_name_or_path=base_path, use_dora=use_dora)


def _dora(o, base_path: str) -> PeftConfig:
    return _lora(o, base_path, use_dora=True)


def _ia3(o, base_path: str) -> PeftConfig:
    # (IA)^3's recipe: rescale keys, values and the feed-forward activations (the input of the second
    # MLP linear); on other architectures, --target picks the modules (no feed-forward ones).
    if o.target is None and o.task == "seq-cls":
        targets, feedforward = r".*\.(key|value|layer\.\d+\.output\.dense)", r".*layer\.\d+\.output\.dense"
    else:
        targets, feedforward = o.targets(), None
    return IA3Config(task_type=TASK_TYPES[o.task], target_modules=targets, feedforward_modules=feedforward,
                     base_model_name_or_path=base_path)


def _lycoris(config_cls):
    # LoHa/LoKr: --r and --alpha are theirs (named r/alpha there); --dropout drops whole rank components
    def build(o, base_path: str) -> PeftConfig:
        return config_cls(task_type=TASK_TYPES[o.task], r=o.r, alpha=o.alpha, rank_dropout=o.dropout,
                          target_modules=o.targets(), base_model_name_or_path=base_path)
    return build


#: ``label -> (run options, base model path) -> adapter config``, in the order ``--help`` lists them.
#: (The builders take ``options.RunOptions``; this module does not import it, since options.py reads
#: :data:`METHODS` from here to check ``--method``.)
CONFIG_BUILDERS: dict[str, Callable[..., PeftConfig]] = {"lora": _lora, "dora": _dora, "ia3": _ia3,
                                                          "loha": _lycoris(LoHaConfig), "lokr": _lycoris(LoKrConfig)}

#: The labels ``--method``/``--methods`` accept.
METHODS = tuple(CONFIG_BUILDERS)


__all__ = ["CONFIG_BUILDERS", "METHODS", "TASK_TYPES"]
