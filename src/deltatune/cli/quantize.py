"""``deltatune train --quantize 4bit|8bit``: QLoRA, the base model loaded through bitsandbytes.

The frozen base linears are stored in 4-bit NF4 (float32 compute) or 8-bit (LLM.int8) while the adapter
trains in float32, as peft users do with ``BitsAndBytesConfig`` and ``prepare_model_for_kbit_training``.
bitsandbytes' CPU path quantizes a linear layer in blocks of 64 inputs, so every layer it would quantize
must have an input width that is a multiple of 64; a model that does not fit is refused before loading.
"""

from __future__ import annotations

import json
import os

from .options import UsageError

#: bitsandbytes' CPU kernels work on blocks of this many inputs.
BLOCK = 64


def bnb_config(kind: str, keep: list[str] | None = None):
    """The ``BitsAndBytesConfig`` of ``--quantize``: ``4bit`` = NF4 with float32 compute (QLoRA's data
    type; the adapter and the activations stay float32), ``8bit`` = LLM.int8. ``keep``: modules left in
    float32 (None: transformers' choice, the output head)."""
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401  (transformers' own message names no install command)
    except ImportError:
        raise UsageError("--quantize needs bitsandbytes: pip install 'deltatune[quant]'") from None
    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                  llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)


def check_widths(model_path: str) -> None:
    """Refuse (:class:`UsageError`) a model whose hidden or feed-forward width is not a multiple of
    :data:`BLOCK`, naming the width: bitsandbytes would fail inside the first forward instead."""
    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return  # (loading the model reports that)
    config = config.get("text_config", config)
    for name in ("hidden_size", "intermediate_size", "n_embd", "d_model", "d_ff", "ffn_dim"):
        width = config.get(name)
        if isinstance(width, int) and width % BLOCK:
            raise UsageError(f"--quantize: the model's {name} is {width}, not a multiple of {BLOCK} as "
                             "bitsandbytes' CPU kernels need; train this model without --quantize")


#: Classification heads: newly initialised and trained in full (``modules_to_save``), so they stay float32
#: (transformers' own choice keeps only a language model's output head).
HEADS = ["classifier", "score"]


def load_quantized(loader, path: str, kind: str, keep: list[str] | None = None, **kwargs):
    """``loader.from_pretrained(path, ...)`` with the linears quantized, made ready for adapter training
    (every base weight frozen, small half-precision tensors in float32). Gradient checkpointing, which
    peft's recipe also switches on, stays off: on a CPU it costs a second forward per step, and the
    float32 run it is compared with keeps its activations too, so the memory figures differ by the
    weights alone."""
    import torch

    from ..quant import prepare_model_for_kbit_training
    from ..quant.bnb import quant_kind

    check_widths(path)
    model = loader.from_pretrained(path, quantization_config=bnb_config(kind, keep), device_map="cpu", **kwargs)
    # The tensors left unquantized (embeddings, norms, heads) are views into the float32 checkpoint's
    # memory map, and quantizing read every page of that map: while one view lives, all of it stays
    # resident (SmolLM2-135M: 528 MB, the size of the float32 weights). Owning copies let it go.
    with torch.no_grad():
        for p in model.parameters():  # (tied weights appear once)
            if quant_kind(p) is None:
                p.data = p.data.clone()
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def let_trainer_train(model) -> None:
    """Let transformers' ``Trainer`` train the head-only baseline on a quantized base.

    The Trainer refuses a quantized model that carries no adapters ("purely quantized"); deltatune's
    ``PeftModel`` says it carries them, but the baseline trains a float32 head over the frozen quantized
    weights with none. Its flag ``_hf_peft_config_loaded`` is set on the baseline model the command line
    built for itself (never saved, never handed back)."""
    if getattr(model, "is_quantized", False) and not getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = True
