"""Tiny seeded models for the test suite (built from configs: no downloads)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*is deprecated.*")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 64


def _seeded(build, seed=0):
    torch.manual_seed(seed)
    model = build()
    model.eval()
    return model


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return _seeded(lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)))


def tiny_gpt2_cls():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    return _seeded(lambda: GPT2ForSequenceClassification(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)))


def tiny_gpt2_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    return _seeded(lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)))


def tiny_bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    return _seeded(lambda: BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3)))


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return _seeded(lambda: T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)))


def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=16, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2),
        image_token_index=VOCAB - 1, vision_feature_layer=-1, image_seq_length=4,
    )
    return _seeded(lambda: LlavaForConditionalGeneration(config))


class ConvNet(nn.Module):
    """A small CNN: Conv2d -> Conv1d over rows -> Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.row = nn.Conv1d(8, 8, 2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv(x))))  # (N, 8, 3, 3)
        h = self.row(h.mean(-1))  # (N, 8, 2)
        return self.head(h.mean(-1))


def tiny_convnet():
    return _seeded(ConvNet)


# Inputs for each model family (fixed seed).
def text_inputs(batch=2, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def t5_inputs():
    inputs = text_inputs()
    inputs["decoder_input_ids"] = text_inputs(seq=5, seed=2)["input_ids"]
    return inputs


def llava_inputs():
    g = torch.Generator().manual_seed(3)
    text = torch.randint(3, VOCAB - 2, (2, 5), generator=g)
    ids = torch.cat([torch.full((2, 4), VOCAB - 1), text], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def conv_inputs():
    g = torch.Generator().manual_seed(4)
    return {"x": torch.randn(2, 3, 8, 8, generator=g)}


def main_output(out) -> torch.Tensor:
    """The tensor to compare from a model output (logits, or the tensor itself)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def perturb_trainable(model, seed: int = 0, scale: float = 0.2) -> None:
    """Add seeded noise to every trainable tensor (adapters, saved modules, biases): non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def random_lora(model, seed: int = 0, scale: float = 0.3) -> None:
    """Overwrite every LoRA tensor (``lora_*``, trainable or not) with seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def greedy_reference(model, inputs, steps):
    """The reference for generate(): one full forward per new token, argmax appended."""
    seq = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def greedy_seq2seq_reference(model, inputs, steps, start_token=0):
    """The reference for an encoder-decoder generate(): decoder tokens by one full forward per new token."""
    dec = torch.full((inputs["input_ids"].shape[0], 1), start_token, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(**inputs, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat([dec, nxt], dim=1)
    return dec


def train_steps(model, batch, steps, lr=0.01):
    """A few Adam steps on a fixed ``batch`` (labels included); returns the losses and the names of the
    parameters that received gradients."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses, grads = [], set()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        grads |= {n for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, grads


def train_lm_steps(model, steps, lr=0.01):
    """:func:`train_steps` for a language model on ``text_inputs()`` predicting its own tokens."""
    batch = text_inputs()
    return train_steps(model, {**batch, "labels": batch["input_ids"]}, steps, lr)



def assert_prompt_and_head_train(model) -> None:
    """A prompt-learning classifier trains exactly its prompt encoder and the head (modules_to_save), and
    a few steps on a fixed batch lower its loss."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.default.embedding.weight",
                         "base_model.model.classifier.modules_to_save.default.weight",
                         "base_model.model.classifier.modules_to_save.default.bias"}
    losses, grads = train_steps(model, {**text_inputs(), "labels": torch.tensor([0, 2])}, 10, lr=0.05)
    assert grads == trainable and losses[-1] < losses[0]


@pytest.fixture
def tmp_dir(tmp_path):
    return str(tmp_path)


#: bitsandbytes settings by name, for the quantized tests (``load_llama64``).
QUANT_CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-double-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="session")
def llama64_dir(tmp_path_factory):
    """A saved tiny Llama for the quantized tests: hidden 64, intermediate 128 (bitsandbytes' CPU 4-bit path
    packs blocks of 64 inputs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    path = tmp_path_factory.mktemp("llama64")
    model.save_pretrained(path)
    return str(path)


def load_llama64(model_dir, quant=None):
    """The saved tiny Llama in float32, or quantized with ``QUANT_CONFIGS[quant]``, in eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if quant is None:
            return AutoModelForCausalLM.from_pretrained(model_dir).eval()
        return AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=BitsAndBytesConfig(**QUANT_CONFIGS[quant]), device_map="cpu").eval()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: dynamo caches compiled code per code object (8 entries, e.g. for
    PeftModel.forward), and other tests' models would fill that cache and make the next compile fail."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


_INIT_FUNCTIONS = {name: fn for name, fn in vars(torch.nn.init).items() if callable(fn) and name.endswith("_")}


@pytest.fixture(autouse=True)
def _init_functions_intact(request):
    """Fail the test that leaves ``torch.nn.init`` patched (and repair it, so later tests do not build models
    with uninitialised weights): transformers' ``no_init_weights`` swaps those functions process-wide while
    ``from_pretrained`` runs, and two threads loading at once can leave them swapped for good."""
    yield
    swapped = [name for name, fn in _INIT_FUNCTIONS.items() if getattr(torch.nn.init, name) is not fn]
    for name in swapped:
        setattr(torch.nn.init, name, _INIT_FUNCTIONS[name])
    assert not swapped, f"{request.node.nodeid} left torch.nn.init.{swapped[0]} (and {len(swapped) - 1} more) patched"


def cli_bert(vocab_size: int):
    """The tiny BERT classifier the command-line tests train (dropout off, seeded)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
