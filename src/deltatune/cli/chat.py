"""Chat fine-tuning for ``--task causal-lm``: rows of chat turns, loss on the answers, exact-match scoring.

A chat row is a JSON object ``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is
the assistant's answer. Each row is rendered with the tokenizer's chat template: the turns before the
answer plus the template's generation prompt form the prompt, and only the tokens after it (the answer
and the template's end-of-turn marker, which teaches the model to stop) carry a loss. Held-out rows are
scored by generating greedily from the prompt and comparing the answer with the reference
(:func:`normalize`: case, surrounding whitespace and a final full stop do not count).

The bundled chat set (``data/support_intents_chat_*.jsonl``) is the bundled support-intents set turned
into such rows by :func:`intent_chat_rows`: the user asks which of the five intents a customer-support
message has, and the answer is the intent's name. It was written for deltatune, like the set it comes
from, and is public domain (CC0-1.0); :func:`deltatune.cli.data.write_bundled_chat_set` regenerates it byte for byte.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import torch

from .options import UsageError

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_CHAT_TRAIN = DATA_DIR / "support_intents_chat_train.jsonl"
BUNDLED_CHAT_TEST = DATA_DIR / "support_intents_chat_test.jsonl"
IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips

#: The system turn of the bundled chat set. Short on purpose: without one, SmolLM2's template inserts a
#: 20-token default system turn into every row, and sequence length is what a CPU step costs.
SYSTEM = "You sort customer-support messages by intent."
#: The user turn; ``{labels}`` lists the intents, ``{text}`` is the message.
QUESTION = "Message: \"{text}\"\nIts intent, in one word ({labels})?"


def intent_chat_rows(rows: Iterable[dict], labels: list[str]) -> list[dict]:
    """Classification rows (``text``, ``label``) as chat rows whose answer is the label.

    Args:
        rows: objects with ``text`` and ``label``.
        labels: every label, in the order the question lists them.

    Returns:
        One ``{"messages": [system, user, assistant]}`` object per row, in order.
    """
    listed = ", ".join(labels[:-1]) + f" or {labels[-1]}" if len(labels) > 1 else labels[0]
    return [{"messages": [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": QUESTION.format(labels=listed, text=row["text"])},
                          {"role": "assistant", "content": str(row["label"])}]} for row in rows]


def is_chat(rows: list[dict]) -> bool:
    """Whether the rows are chat rows (the first one has ``messages``)."""
    return bool(rows) and "messages" in rows[0]


def check_chat_rows(rows: list[dict], path: str) -> None:
    """Raise :class:`UsageError` naming the first row that is not a usable chat row."""
    for number, row in enumerate(rows, 1):
        messages = row.get("messages")
        where = f"{path}: row {number}"
        if not isinstance(messages, list) or len(messages) < 2:
            raise UsageError(f"{where}: 'messages' must be a list of at least two turns (a question and its answer)")
        for turn in messages:
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                    or not isinstance(turn.get("content"), str):
                raise UsageError(f"{where}: each turn must be an object with string 'role' and 'content'")
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise UsageError(f"{where}: the last turn must be a non-empty 'assistant' answer (the training target)")


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # (some versions return a BatchEncoding)
        ids = ids["input_ids"]
    return list(ids)


def prompt_and_answer(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (turns before the answer + generation prompt) and of the answer part.

    Raises:
        UsageError: the tokenizer has no chat template, or its rendering of the whole conversation does
            not begin with its rendering of the prompt (then the answer tokens cannot be told apart).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("chat rows need a tokenizer with a chat template; this model's tokenizer has none")
    prompt = _template_ids(tokenizer, messages[:-1], True)
    full = _template_ids(tokenizer, messages, False)
    if full[:len(prompt)] != prompt or len(full) == len(prompt):
        raise UsageError("the chat template renders a conversation differently from its prompt; "
                         "cannot find the answer tokens")
    return prompt, full[len(prompt):]


class ChatDataset(torch.utils.data.Dataset):
    """Chat rows as ``input_ids``/``attention_mask``/``labels``, the prompt's labels set to -100.

    Args:
        rows: chat rows (checked with :func:`check_chat_rows`).
        tokenizer: a tokenizer with a chat template.
        max_length: the most tokens per row; a longer row is refused, not cut (a cut answer would train
            the model to stop mid-answer).
    """

    def __init__(self, rows: list[dict], tokenizer, max_length: int):
        self.items, self.prompts, self.answers = [], [], []
        for number, row in enumerate(rows, 1):
            prompt, answer = prompt_and_answer(tokenizer, row["messages"])
            if len(prompt) + len(answer) > max_length:
                raise UsageError(f"chat row {number} has {len(prompt) + len(answer)} tokens, more than "
                                 f"--max-length {max_length}; pass a larger --max-length")
            ids = prompt + answer
            self.items.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                               "labels": [IGNORE_INDEX] * len(prompt) + answer})
            self.prompts.append(prompt)
            self.answers.append(row["messages"][-1]["content"])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class ChatCollator:
    """Pads a batch on the left (``pad_id`` for inputs, 0 for the mask, -100 for labels), with the
    ``position_ids`` each row would have unpadded.

    Left padding puts every row's answer in the batch's last positions. With ``keep_logits`` (for models
    whose forward takes ``logits_to_keep``, as transformers' causal LMs do) the batch asks only for the
    logits of those positions and carries only their labels: the output layer (a fifth of SmolLM2's
    compute: 49,152 vocabulary rows) then runs on a few positions per row instead of all of them, with the
    same loss. (transformers' causal-LM loss pairs logit ``i`` with label ``i + 1`` of the same slice, so
    the slice starts one position before the longest answer.)
    """

    def __init__(self, pad_id: int, keep_logits: bool = False):
        self.pad_id, self.keep_logits = pad_id, keep_logits

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        batch = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
            batch[key] = torch.tensor([[fill] * (width - len(item[key])) + item[key] for item in items])
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if self.keep_logits:
            answered = (batch["labels"] != IGNORE_INDEX).any(0).nonzero()
            keep = width - int(answered[0]) + 1 if len(answered) else 1
            keep = min(keep, width)
            batch["labels"] = batch["labels"][:, width - keep:]
            batch["logits_to_keep"] = keep
        return batch


def takes_logits_to_keep(model) -> bool:
    """Whether the (base) model's forward takes ``logits_to_keep``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def normalize(answer: str) -> str:
    """The form answers are compared in: lower case, inner whitespace collapsed, no final full stop."""
    return re.sub(r"\s+", " ", answer).strip().rstrip(".").strip().lower()


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to token-id prompts, batched with left padding, decoded without special tokens."""
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from tqdm.auto import tqdm

    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="answering", unit="batch", leave=False):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


def score_answers(predictions: list[str], references: list[str]) -> dict:
    """Exact match (after :func:`normalize`), and how often the answer names the reference and no other.

    The second number (``names_answer``: the prediction mentions, as whole words, its reference and none
    of the test set's other distinct references) says how often a model that answers in a sentence ("The
    intent is billing.") gets it right at all, so an untuned baseline is not judged by its format alone;
    a model that lists every option names them all and scores nothing."""
    refs = [normalize(r) for r in references]
    distinct = sorted(set(refs))

    def mentions(prediction: str, answer: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", prediction) is not None

    exact = named = 0
    for prediction, ref in zip(map(normalize, predictions), refs):
        exact += prediction == ref
        named += mentions(prediction, ref) and not any(mentions(prediction, other) for other in distinct
                                                        if other != ref)
    n = max(len(refs), 1)
    return {"exact_match": exact / n, "names_answer": named / n}


def answer_token_budget(dataset: ChatDataset, slack: int = 8) -> int:
    """New tokens to generate: the longest reference answer's tokens plus ``slack`` (room for a model
    that answers in a short sentence before it is scored)."""
    return max(len([t for t in item["labels"] if t != IGNORE_INDEX]) for item in dataset.items) + slack
