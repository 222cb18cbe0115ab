"""The adapter methods ``deltatune train``/``ab`` offer, by command-line label, and the config each builds.

This is the command line's own table, not the registry's: a label is a recipe over the run options
(``dora`` is LoRA with ``use_dora``; ``ia3`` picks BERT's keys, values and feed-forward outputs when no
``--target`` is given), which a method's registration has no business knowing. Adding a label here is
all it takes for ``--method``/``--methods`` to accept it. A label may also bring settings of its own
(:data:`LABEL_DEFAULTS`: a learning rate, VeRA's rank) that apply wherever the user set none.
"""

from __future__ import annotations

from typing import Callable

from ..config import PeftConfig
from ..methods.ia3 import IA3Config
from ..methods.loha import LoHaConfig
from ..methods.lokr import LoKrConfig
from ..methods.lora import LoraConfig
from ..methods.oft import OFTConfig
from ..methods.vera import VeraConfig

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


#: OFT's block size (peft's default): 384/1536-wide MiniLM layers get 12/48 blocks of 32 x 32.
OFT_BLOCK_SIZE = 32


def _oft(o, base_path: str) -> PeftConfig:
    # OFT: peft's r is the number of blocks per layer, but one count cannot suit layers of input 384 and
    # 1536 alike; the block size sets cost and capacity, so the label fixes it and --r/--alpha are unused.
    return OFTConfig(task_type=TASK_TYPES[o.task], r=0, oft_block_size=OFT_BLOCK_SIZE, module_dropout=o.dropout,
                     target_modules=o.targets(), base_model_name_or_path=base_path)


def _vera(o, base_path: str) -> PeftConfig:
    # VeRA: deltatune neither writes nor reads the shared projections; they are regenerated from the seed
    return VeraConfig(task_type=TASK_TYPES[o.task], r=o.r, vera_dropout=o.dropout, save_projection=False,
                      target_modules=o.targets(), base_model_name_or_path=base_path)


#: ``label -> (run options, base model path) -> adapter config``, in the order ``--help`` lists them.
#: (The builders take ``options.RunOptions``; this module does not import it, since options.py reads
#: :data:`METHODS` from here to check ``--method``.)
CONFIG_BUILDERS: dict[str, Callable[..., PeftConfig]] = {"lora": _lora, "dora": _dora, "ia3": _ia3,
                                                          "loha": _lycoris(LoHaConfig), "lokr": _lycoris(LoKrConfig),
                                                          "oft": _oft, "vera": _vera}

#: Options a label sets where neither the command line nor the config file does (measured on the embedded
#: default: MiniLM-L6 on the bundled support-intents set, 3 seeds; README "Methods on the bundled task").
LABEL_DEFAULTS: dict[str, dict] = {"ia3": {"lr": 3e-3}, "loha": {"lr": 3e-3}, "lokr": {"lr": 3e-3},
                                   "vera": {"r": 256, "lr": 1e-2}}

#: The labels ``--method``/``--methods`` accept.
METHODS = tuple(CONFIG_BUILDERS)


__all__ = ["CONFIG_BUILDERS", "LABEL_DEFAULTS", "METHODS", "TASK_TYPES"]
