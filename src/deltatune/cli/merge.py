"""``deltatune merge``: fold an adapter into its base and save a plain transformers model folder.

The merged folder is written under a temporary name, reloaded with ``transformers`` alone and compared
with base + adapter on sample inputs; only if they agree within 1e-5 is it renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..checkpoint import read_adapter_weights
from ..config import PeftConfig, TaskType
from ..methods.prompt_tuning.config import PromptTuningConfig
from ..model import PeftModel
from .data import BUNDLED_TEST, read_rows
from .inspect_adapter import adapter_folder
from .options import UsageError
from .train import load_tokenizer, quiet_transformers

TOLERANCE = 1e-5


def allowed_difference(want: torch.Tensor) -> float:
    """The largest output difference a correct merge may show: :data:`TOLERANCE`, scaled by the largest
    output when that exceeds 1. Why: float32 rounding of ``W + BA`` versus ``xW + xBA`` grows with the
    outputs' size; SmolLM2-135M's logits (up to about 20, 30 layers) differ by ~1e-4 after a correct merge."""
    return TOLERANCE * max(1.0, want.abs().max().item())


def _auto_class(task_type):
    import transformers

    return {
        TaskType.SEQ_CLS: transformers.AutoModelForSequenceClassification,
        TaskType.CAUSAL_LM: transformers.AutoModelForCausalLM,
        TaskType.SEQ_2_SEQ_LM: transformers.AutoModelForSeq2SeqLM,
        TaskType.TOKEN_CLS: transformers.AutoModelForTokenClassification,
        TaskType.QUESTION_ANS: transformers.AutoModelForQuestionAnswering,
    }.get(task_type, transformers.AutoModel)


def _labels(run_or_adapter: str, folder: str, config) -> dict:
    """``num_labels``/``id2label`` for a classification head, from the run's metrics or the weights."""
    if config.task_type != TaskType.SEQ_CLS:
        return {}
    metrics = os.path.join(run_or_adapter, "metrics.json")
    if os.path.isfile(metrics):
        labels = json.load(open(metrics))["dataset"]["labels"]
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {l: i for i, l in enumerate(labels)}}
    for key, tensor in read_adapter_weights(folder).items():
        if key.endswith(("classifier.weight", "score.weight")):
            return {"num_labels": tensor.shape[0]}
    return {}


def _sample_texts() -> list[str]:
    return [row["text"] for row in read_rows(BUNDLED_TEST)[:8]]


#: sentence-transformers files of a base folder: which modules follow the transformer (pooling,
#: normalisation) and their settings. ``save_pretrained`` writes none of them; without them a merged
#: encoder is served (or loaded by sentence-transformers) with another pooling and no normalisation.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def copy_sentence_transformers_files(base_path: str, dest: str) -> list[str]:
    """Copy the sentence-transformers files of ``base_path`` (and the module folders ``modules.json``
    names, e.g. ``1_Pooling/``) into ``dest``; returns the names copied (none for other folders).

    A module path that is absolute or leads out of ``base_path`` is not followed."""
    copied = []
    for name in SENTENCE_TRANSFORMERS_FILES:
        if os.path.isfile(os.path.join(base_path, name)):
            shutil.copy2(os.path.join(base_path, name), os.path.join(dest, name))
            copied.append(name)
    if "modules.json" in copied:
        with open(os.path.join(base_path, "modules.json")) as fh:
            modules = json.load(fh)
        for module in modules if isinstance(modules, list) else []:
            sub = os.path.normpath(str(module.get("path") or "")) if isinstance(module, dict) else "."
            if sub in ("", ".") or os.path.isabs(sub) or sub.split(os.sep)[0] == "..":
                continue
            if os.path.isdir(os.path.join(base_path, sub)):  # (Normalize has no folder of its own)
                shutil.copytree(os.path.join(base_path, sub), os.path.join(dest, sub), dirs_exist_ok=True)
                copied.append(sub)
    return copied


#: Files a saved tokenizer folder holds (``save_pretrained`` writes the first; the others are vocabularies).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model")


def _tokenizer_and_inputs(path: str, base_path: str, config):
    """The run's (or base's) tokenizer and sample inputs from it; with no tokenizer files in either folder,
    ``(None, inputs)`` of fixed token ids: merging weights does not need one. (Recent transformers build an
    empty-vocabulary tokenizer for such a folder instead of failing, so we look for the files.)"""
    candidates = (os.path.join(path, "tokenizer"), base_path)
    tokenizer_dir = next((d for d in candidates if any(os.path.isfile(os.path.join(d, f)) for f in TOKENIZER_FILES)),
                         None)
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    if tokenizer is not None:
        inputs = dict(tokenizer(_sample_texts(), padding=True, return_tensors="pt"))
    else:
        from transformers import AutoConfig

        vocab = getattr(AutoConfig.from_pretrained(base_path), "vocab_size", None) or 100
        ids = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in inputs and config.task_type == TaskType.CAUSAL_LM:
        inputs.pop("token_type_ids")
    return tokenizer, inputs


def _outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def merge_command(path: str, output: str, model_override: str | None = None) -> float:
    quiet_transformers()
    folder = adapter_folder(path)
    config = PeftConfig.from_pretrained(folder)
    if isinstance(config, PromptTuningConfig):
        raise UsageError(f"{folder} is a {config.peft_type.value} adapter: its virtual tokens are inputs, not "
                         "changes to the base weights, so there are no weights to merge")
    base_path = model_override or config.base_model_name_or_path
    if not base_path or not os.path.isdir(base_path):
        raise UsageError(f"base model folder {base_path!r} not found; pass --model")
    if os.path.exists(output) and os.listdir(output):
        raise UsageError(f"output folder {output!r} already exists and is not empty")
    auto = _auto_class(config.task_type)
    extra = _labels(path, folder, config)
    tokenizer, inputs = _tokenizer_and_inputs(path, base_path, config)

    adapted = PeftModel.from_pretrained(auto.from_pretrained(base_path, **extra), folder).eval()
    want = _outputs(adapted, inputs)
    merged = adapted.merge_and_unload()
    tmp = os.path.abspath(output) + f".partial-{os.getpid()}"
    try:
        merged.save_pretrained(tmp)
        if tokenizer is not None:  # copied when there is one; the weights do not need it
            tokenizer.save_pretrained(tmp)
        copy_sentence_transformers_files(base_path, tmp)
        reloaded = auto.from_pretrained(tmp).eval()
        diff = (_outputs(reloaded, inputs) - want).abs().max().item()
        allowed = allowed_difference(want)
        if diff > allowed:
            raise UsageError(f"merged model differs from base + adapter by {diff:.2e} (> {allowed:.2e}: {TOLERANCE} "
                             f"times the largest output, at least 1); not saved")
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {folder} into {base_path}\nsaved a plain transformers model to {output} "
          f"(max abs output difference vs base + adapter: {diff:.2e})")
    return diff
