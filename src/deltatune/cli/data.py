"""Datasets for the command line: the bundled support-intents set, or the user's JSONL/CSV/TXT files.

A plain-text file (``.txt``, ``--task causal-lm`` only) is split into documents by one rule: if it has a
blank line between two lines of text, each blank-line-separated paragraph is one document (its lines kept
together, joined by newlines); otherwise each non-empty line is one document. Leading and trailing blank
lines do not count, and trailing whitespace on a line is dropped.

The bundled set (``data/support_intents_*.jsonl``, 300 train / 100 test short customer-support messages
in five intent classes) was written for deltatune from templates by ``scripts/make_dataset.py`` and is
public domain (CC0-1.0). Its test sentences use phrasings absent from the training set. For
``--task causal-lm`` the bundled set is the same sentences as chat rows (``data/support_intents_chat_*``,
see :mod:`.chat`); a JSONL file of ``{"messages": [...]}`` rows is a chat set too.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat import BUNDLED_CHAT_TEST, BUNDLED_CHAT_TRAIN, check_chat_rows, intent_chat_rows, is_chat
from .options import RunOptions, UsageError

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_TRAIN = DATA_DIR / "support_intents_train.jsonl"
BUNDLED_TEST = DATA_DIR / "support_intents_test.jsonl"
SPLIT_SEED = 1234  # fixed, so --seed changes training randomness but never the split


@dataclass
class TextData:
    train: list[dict]
    test: list[dict]
    labels: list[str]  # empty for causal-lm


def text_documents(text: str) -> tuple[list[str], str]:
    """The documents of a plain-text corpus and the rule that split it (``"paragraphs"`` or ``"lines"``).

    Blank-line-separated paragraphs when the text has a blank line between lines of text, else one
    document per line (see the module docstring)."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    if "" not in [line.strip() for line in lines]:
        return lines, "lines"
    documents, current = [], []
    for line in lines + [""]:  # (the sentinel closes the last paragraph)
        if line.strip():
            current.append(line)
        elif current:
            documents.append("\n".join(current))
            current = []
    return documents, "paragraphs"


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL (one object per line), CSV/TSV (header row) or plain-text (``text`` only) file."""
    path = str(path)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if not text.strip():
        raise UsageError(f"data file {path!r} is empty")
    if path.endswith(".txt"):
        documents, rule = text_documents(text)
        if os.environ.get("RANK", "0") == "0":  # (once under torchrun, not once per process)
            print(f"{path}: {len(documents)} documents (one per {rule[:-1]})")
        rows = [{"text": document} for document in documents]
    elif path.endswith((".csv", ".tsv")):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.endswith(".tsv") else ","))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}, line {number}: expected a JSON object with a 'text' field")
            rows.append(row)
    if not rows:
        raise UsageError(f"data file {path!r} has no rows")
    return rows


def _check_columns(rows: list[dict], path: str, needed: tuple[str, ...]) -> None:
    found = sorted(rows[0])
    for i, row in enumerate(rows):
        missing = [c for c in needed if row.get(c) in (None, "")]
        if missing:
            raise UsageError(f"{path}: row {i + 1} is missing column(s) {missing} (columns found: {found})")


def load_text_data(o: RunOptions) -> TextData:
    """Train/test rows and the label list for the run's task, validated."""
    needed = ("text", "label") if o.task == "seq-cls" else ("text",)
    for path in (o.data, o.test_data):
        if o.task == "seq-cls" and path is not None and str(path).endswith(".txt"):
            raise UsageError(f"{path}: a plain-text file has no labels; --task seq-cls needs JSONL or CSV with "
                             f"text and label columns (.txt is for --task causal-lm)")
    if o.data is None:
        # causal-lm's bundled set is the same sentences as chat turns answered with the intent (chat.py).
        train_path, test_path = ((BUNDLED_TRAIN, BUNDLED_TEST) if o.task == "seq-cls"
                                 else (BUNDLED_CHAT_TRAIN, BUNDLED_CHAT_TEST))
        train, test, train_name, test_name = read_rows(train_path), read_rows(test_path), str(train_path), str(test_path)
    else:
        train, train_name = read_rows(o.data), o.data
        if o.test_data:
            test, test_name = read_rows(o.test_data), o.test_data
        else:
            rows = list(train)
            random.Random(SPLIT_SEED).shuffle(rows)
            n_test = max(1, round(len(rows) * o.test_fraction))
            if len(rows) - n_test < 1:
                raise UsageError(f"data file {o.data!r} has too few rows ({len(rows)}) to split off a test set")
            test, train, test_name = rows[:n_test], rows[n_test:], o.data
    if o.task == "causal-lm" and (is_chat(train) or is_chat(test)):
        # Chat rows train on their last (assistant) turn; both files must be chat rows then.
        for rows, name in ((train, train_name), (test, test_name)):
            if not all("messages" in row for row in rows):
                raise UsageError(f"{name}: mixes chat rows ('messages') with other rows; use one kind per run")
            check_chat_rows(rows, name)
        return TextData(train, test, [])
    _check_columns(train, train_name, needed)
    _check_columns(test, test_name, needed)
    labels: list[str] = []
    if o.task == "seq-cls":
        labels = sorted({str(r["label"]) for r in train})
        unknown = sorted({str(r["label"]) for r in test} - set(labels))
        if unknown:
            raise UsageError(f"{test_name}: unknown label(s) {unknown} that never occur in the training data")
        if len(labels) < 2:
            raise UsageError(f"{train_name}: need at least two distinct labels, found {labels}")
    return TextData(train, test, labels)


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenized examples: ``input_ids``, ``attention_mask`` and (classification) ``labels``."""

    def __init__(self, rows: list[dict], tokenizer, max_length: int, labels: list[str]):
        encoded = tokenizer([str(r["text"]) for r in rows], truncation=True, max_length=max_length)
        index = {label: i for i, label in enumerate(labels)}
        self.items = []
        for i, row in enumerate(rows):
            item = {k: encoded[k][i] for k in ("input_ids", "attention_mask")}
            if labels:
                item["labels"] = index[str(row["label"])]
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def write_bundled_chat_set(folder: str | os.PathLike = DATA_DIR) -> None:
    """Write ``support_intents_chat_{train,test}.jsonl`` into ``folder`` (by default, regenerate the
    bundled files) from the bundled support-intents files, each file atomically."""
    train = read_rows(BUNDLED_TRAIN)
    labels = sorted({row["label"] for row in train})
    for source, name in ((BUNDLED_TRAIN, BUNDLED_CHAT_TRAIN.name), (BUNDLED_TEST, BUNDLED_CHAT_TEST.name)):
        dest = Path(folder) / name
        lines = [json.dumps(row, ensure_ascii=False) for row in intent_chat_rows(read_rows(source), labels)]
        tmp = f"{dest}.partial-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, dest)
