"""Serving an encoder (BERT-style): sentence embeddings and class probabilities for rows of many
adapters in one forward."""

from __future__ import annotations

import json
import os
import threading
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import ServeError
from .host import ModelHost


def pooling_of(model_dir: str) -> tuple[str, bool]:
    """How a folder's embeddings are pooled: (``mean``/``cls``/``max``, normalised?).

    A sentence-transformers folder says so (``1_Pooling/config.json``, ``modules.json``); any other
    encoder gets mean pooling without normalisation."""
    mode, normalize = "mean", False
    pooling = os.path.join(model_dir, "1_Pooling", "config.json")
    if os.path.isfile(pooling):
        with open(pooling) as fh:
            cfg = json.load(fh)
        for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                          ("pooling_mode_mean_tokens", "mean")):
            if cfg.get(key):
                mode = name
                break
    modules = os.path.join(model_dir, "modules.json")
    if os.path.isfile(modules):
        with open(modules) as fh:
            normalize = any(str(m.get("type", "")).endswith("Normalize") for m in json.load(fh))
    return mode, normalize


def max_tokens_of(model_dir: str, config, limit: Optional[int]) -> int:
    """The longest input (in tokens) the server accepts: the model's positions, the sentence-transformers
    ``max_seq_length`` and ``limit``, whichever is smallest."""
    sizes = [getattr(config, "max_position_embeddings", None) or 512]
    st = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(st):
        with open(st) as fh:
            sizes.append(json.load(fh).get("max_seq_length") or sizes[0])
    if limit:
        sizes.append(limit)
    return int(min(sizes))


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """Pool token states ``hidden`` (rows, tokens, dim) over the tokens ``mask`` marks."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        out = hidden[:, 0]
    elif mode == "max":
        out = hidden.masked_fill(mask == 0, float("-inf")).max(1).values
    else:
        out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    out = out.float()
    return F.normalize(out, dim=-1) if normalize else out


class EncoderEngine:
    """Tokenises requests and runs batches of rows (one text each) for an encoder host.

    Args:
        host: The model and its adapters.
        tokenizer: The base model's tokenizer.
        model_dir: The base folder (pooling and length limits are read from it).
        max_input_tokens: An extra limit on input length (None: the model's).
    """

    kind = "encoder"

    def __init__(self, host: ModelHost, tokenizer, model_dir: str, max_input_tokens: Optional[int] = None):
        self.host, self.tokenizer = host, tokenizer
        self.pooling, self.normalize = pooling_of(model_dir)
        self.max_tokens = max_tokens_of(model_dir, host.base.config, max_input_tokens)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(host.base.parameters()).device
        # Fast tokenizers change their padding/truncation state on each call, which fails when two
        # threads call at once; requests tokenise under this lock.
        self._lock = threading.Lock()

    def encode(self, inputs: Sequence, param: str = "input") -> list[list[int]]:
        """Token ids per input (a string, or a list of ids already), checked against the length limit."""
        out = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if not item:
                    raise ServeError(400, f"input {i} is an empty string", param=param)
                with self._lock:
                    ids = self.tokenizer(item, truncation=False)["input_ids"]
            else:
                ids = list(item)
                vocab = self.host.base.config.vocab_size
                if any(not 0 <= t < vocab for t in ids):
                    raise ServeError(400, f"input {i} holds token ids outside the vocabulary (0..{vocab - 1})",
                                     param=param)
            if not ids:
                raise ServeError(400, f"input {i} is empty", param=param)
            if len(ids) > self.max_tokens:
                raise ServeError(400, f"input {i} has {len(ids)} tokens; this model takes at most "
                                      f"{self.max_tokens}", param=param)
            out.append(ids)
        return out

    def run(self, names: list[Optional[str]], rows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(embedding, class probabilities) for each row; row ``i`` runs adapter ``names[i]``.

        Adapters whose heads have different numbers of classes give logits of different widths, which
        one call cannot return together: rows are split by head width, one dispatch per width."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        model = self.host.model

        def call(index: list[int], adapter_names: Optional[list[str]]):
            extra = {} if adapter_names is None else {"adapter_names": adapter_names}
            sel = torch.tensor(index, device=self.device)
            out = model(input_ids=ids[sel], attention_mask=mask[sel], output_hidden_states=True, **extra)
            embedding = pool(out.hidden_states[-1], mask[sel], self.pooling, self.normalize)
            return embedding, torch.softmax(out.logits.float(), dim=-1)

        widths: dict[int, list[int]] = {}
        for i, name in enumerate(names):
            widths.setdefault(self.host.head_size(name), []).append(i)
        out: list = [None] * len(rows)
        with torch.no_grad():
            for part in widths.values():
                embeddings, probs = self.host.dispatcher.run(
                    [names[i] for i in part], lambda index, an, part=part: call([part[j] for j in index], an))
                for j, i in enumerate(part):
                    out[i] = (embeddings[j].cpu(), probs[j].cpu())
        return out
