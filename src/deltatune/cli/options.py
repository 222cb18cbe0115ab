"""Options of ``deltatune train``/``ab``: defaults, a ``--config`` file (YAML or JSON), command-line flags.

Precedence: flags given on the command line > the config file > the defaults below. The resolved options
are written into each run folder (``config.json``) so a run can be repeated with ``--config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .method_labels import LABEL_DEFAULTS, METHODS

TASKS = ("seq-cls", "causal-lm", "image-cls")
DEFAULT_TARGETS = {
    "seq-cls": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "causal-lm": "all-linear",
    # the seeds' DINO recipe: LoRA on attention queries and values (transformers 5 names DINOv2's q_proj/v_proj,
    # 4.x and ViT query/value; a list entry that matches no module is fine while another one matches)
    "image-cls": ["query", "value", "q_proj", "v_proj"],
}

#: Defaults of the bundled chat job (``--task causal-lm`` with no ``--data``): its rows are about 80
#: SmolLM2 tokens long, and on 2 CPU cores one epoch (38 steps; the learning rate decays linearly to 0)
#: is what fits in a few minutes.
CHAT_JOB_DEFAULTS = {"epochs": 1, "batch_size": 8, "max_length": 128, "lr": 2e-3}


class UsageError(ValueError):
    """Bad user input for the command line: printed as one line, exit status 2."""


@dataclass
class RunOptions:
    model: Optional[str] = None          # local transformers folder; None = the embedded MiniLM-L6
    data: Optional[str] = None           # JSONL/CSV; None = the bundled support-intents dataset
    test_data: Optional[str] = None      # held-out file; None = a fixed split of --data
    task: str = "seq-cls"
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target: Optional[Any] = None         # list of names or a regex; None = per-task default
    epochs: int = 5
    lr: float = 5e-4
    baseline_lr: float = 5e-3
    batch_size: int = 16
    max_length: int = 64
    seed: int = 0
    test_fraction: float = 0.2
    baseline: bool = True
    output: Optional[str] = None
    overwrite: bool = False
    threads: Optional[int] = None        # torch CPU threads; None = torch's default (one per core)
    fsdp: bool = False                   # shard with FSDP2 under torchrun/accelerate launch (cli/distributed.py)
    seeds: list = field(default_factory=lambda: [0, 1, 2])  # for `deltatune ab`
    methods: list = field(default_factory=lambda: ["lora", "dora"])  # for `deltatune ab`
    quantize: Optional[str] = None       # "4bit"/"8bit": load the base through bitsandbytes (QLoRA)
    # `deltatune ab`: per label of `methods`, the label's own defaults (LABEL_DEFAULTS) that neither the
    # config file nor a flag overrode; set by resolve(), never read from a file
    label_settings: dict = field(default_factory=dict)

    def targets(self):
        return self.target if self.target is not None else DEFAULT_TARGETS[self.task]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_config_file(path: str) -> dict:
    """A YAML or JSON mapping of option names to values."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    text = open(path, encoding="utf-8").read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise UsageError(f"config file {path!r} could not be parsed: {exc}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(args: argparse.Namespace, given: set[str]) -> RunOptions:
    """Defaults < ``--config`` file < flags actually given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    known = {f.name for f in dataclasses.fields(RunOptions)} - {"label_settings"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"unknown option(s) {unknown} in {args.config}; known: {sorted(known)}")
    for name in given:
        values[name] = getattr(args, name)
    if values.get("task") == "causal-lm" and values.get("data") is None:
        for name, value in CHAT_JOB_DEFAULTS.items():  # (only where neither the file nor a flag set it)
            values.setdefault(name, value)
    # A label's own settings fill only what neither the file nor a flag set; `ab` runs several labels
    # under one set of options, so it keeps them per label.
    method = values.get("method", RunOptions.method)
    unset = {label: {k: v for k, v in LABEL_DEFAULTS.get(label, {}).items() if k not in values}
             for label in {method, *values.get("methods", RunOptions().methods)}}
    values.update(unset[method])
    values["label_settings"] = {label: settings for label, settings in unset.items() if settings}
    options = RunOptions(**values)
    validate(options)
    return options


def validate(o: RunOptions) -> None:
    if o.task not in TASKS:
        raise UsageError(f"unknown task {o.task!r}; choose one of {list(TASKS)}")
    for method in [o.method, *o.methods]:
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r}; available: {list(METHODS)}")
    if o.quantize not in (None, "4bit", "8bit"):
        raise UsageError(f"--quantize must be 4bit or 8bit, got {o.quantize!r}")
    if not isinstance(o.fsdp, bool) or (o.fsdp and o.task == "image-cls"):
        raise UsageError(f"--fsdp is a switch for --task seq-cls or causal-lm, got {o.fsdp!r} with {o.task!r}")
    if o.threads is not None and (not isinstance(o.threads, int) or o.threads < 1):
        raise UsageError(f"--threads must be an integer >= 1, got {o.threads!r}")
    for name, low in (("r", 1), ("epochs", 1), ("batch_size", 1), ("max_length", 2)):
        value = getattr(o, name)
        if not isinstance(value, int) or value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    for name in ("lr", "baseline_lr", "alpha"):
        if not isinstance(getattr(o, name), (int, float)) or getattr(o, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(o, name)!r}")
    if not 0 <= o.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {o.dropout!r}")
    if not 0 < o.test_fraction < 1:
        raise UsageError(f"--test-fraction must be in (0, 1), got {o.test_fraction!r}")
    if o.model is not None and not os.path.isdir(o.model):
        raise UsageError(f"model folder {o.model!r} does not exist")
    for name in ("data", "test_data"):
        path = getattr(o, name)
        if path is not None and not (os.path.isfile(path) or (o.task == "image-cls" and os.path.isdir(path))):
            raise UsageError(f"data {'file or image folder' if o.task == 'image-cls' else 'file'} {path!r} does not exist")


def _label_note(name: str) -> str:
    """``"; vera 256"``: the labels that bring their own default for option ``name``."""
    labels = [f"{label} {settings[name]:g}" for label, settings in LABEL_DEFAULTS.items() if name in settings]
    return "; " + ", ".join(labels) if labels else ""


def add_run_arguments(parser: argparse.ArgumentParser, single_run: bool = True) -> None:
    """Flags shared by ``train`` and ``ab``; defaults are None so we can tell which were given.

    ``--method`` and ``--seed`` name one run, so only ``train`` (``single_run``) takes them; ``ab`` has
    ``--methods``/``--seeds`` and refuses the singular flags rather than ignoring them."""
    a = parser.add_argument
    a("--config", help="YAML or JSON file with any of these options (flags override it)")
    a("--model", help="local transformers model folder (default: the embedded MiniLM-L6 encoder)")
    a("--data", help="JSONL or CSV with text/label columns; for causal-lm a text column, or a .txt file (one "
                     "document per line, or per blank-line-separated paragraph if it has blank lines); for "
                     "image-cls an image folder (class_name/*.png|jpg) or a CSV of path,label "
                     "(default: bundled)")
    a("--test-data", dest="test_data", help="held-out file (default: a fixed split of --data)")
    a("--test-fraction", dest="test_fraction", type=float,
      help="share of --data held out for evaluation when no --test-data is given (default 0.2)")
    a("--task", help=f"one of {list(TASKS)} (default seq-cls)")
    if single_run:
        a("--method", help=f"adapter method, one of {list(METHODS)} (default lora)")
    # (--rank too: under torchrun, "--r" is an ambiguous prefix of its own options and never gets here)
    a("--r", "--rank", dest="r", type=int, help=f"adapter rank (default 8{_label_note('r')})")
    a("--alpha", type=float, help="lora_alpha (default 16)")
    a("--dropout", type=float, help="adapter dropout (default 0.05)")
    a("--target", nargs="+", help="target module names (suffix match), or one regex (default per task)")
    a("--epochs", type=int, help="training epochs (default 5)")
    a("--lr", type=float, help=f"adapter learning rate (default 5e-4{_label_note('lr')})")
    a("--baseline-lr", dest="baseline_lr", type=float, help="head-only baseline learning rate (default 5e-3)")
    a("--batch-size", dest="batch_size", type=int, help="global batch size (default 16)")
    a("--max-length", dest="max_length", type=int, help="max tokens per example (default 64)")
    if single_run:
        a("--seed", type=int, help="random seed (default 0)")
        a("--fsdp", action="store_const", const=True,
          help="FSDP2: shard each layer and the model over the processes of torchrun/accelerate launch (default: DDP)")
    a("--output", help="run folder (default runs/<task>-<method>-<time>)")
    a("--overwrite", action="store_const", const=True, help="replace an existing run folder")
    a("--quantize", help="load the base model quantized, 4bit (NF4) or 8bit, through bitsandbytes (QLoRA); "
                         "the adapter stays float32")
    a("--threads", type=int, help="CPU threads for torch (default: one per core; on a machine busy with "
                                  "other work, 1 can be several times faster)")


def given_options(args: argparse.Namespace) -> set[str]:
    names = {f.name for f in dataclasses.fields(RunOptions)}
    given = {k for k, v in vars(args).items() if k in names and v is not None}
    if "target" in given and len(args.target) == 1 and any(c in args.target[0] for c in "*()|\\[]^$"):
        args.target = args.target[0]  # a single regex string
    return given
