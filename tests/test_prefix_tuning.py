"""Prefix tuning (P-tuning v2) against peft: decoder-only, encoder-decoder and encoder models.

Checkpoints both ways, outputs and losses, generation, training, padding, errors.
"""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune as dt
from conftest import (VOCAB, assert_prompt_and_head_train, greedy_reference, greedy_seq2seq_reference,
                      perturb_trainable, t5_inputs, text_inputs, tiny_bert_cls, tiny_gpt2_cls, tiny_gpt2_lm, tiny_llama,
                      tiny_t5, train_lm_steps, train_steps)


def _t5(layers):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


def _round_trip(direction, build, config_kwargs, tmp_path, seed=3):
    """(source model, reloaded model in the other library) for one non-trivial prefix adapter."""
    src, dst = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    source = src.get_peft_model(build(), src.PrefixTuningConfig(**config_kwargs))
    perturb_trainable(source, seed, 0.5)
    source.save_pretrained(str(tmp_path))
    return source, dst.PeftModel.from_pretrained(build(), str(tmp_path))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2_lm], ids=["llama-gqa", "gpt2"])
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_causal_lm_checkpoints_both_ways(build, projection, direction, tmp_path):
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection, encoder_hidden_size=16)
    source, target = _round_trip(direction, build, kwargs, tmp_path)
    inputs = text_inputs()
    with torch.no_grad():
        want, got = (m(**inputs, labels=inputs["input_ids"]) for m in (source, target))
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)
    assert (want.logits - build()(**inputs).logits).abs().max() > 1e-3


def test_causal_lm_generate_and_training():
    model = dt.get_peft_model(tiny_llama(), dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                  prefix_projection=True, encoder_hidden_size=16))
    perturb_trainable(model, 4, 0.5)
    inputs = text_inputs(batch=1, seq=4)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, greedy_reference(model, inputs, 5))  # greedy decoding by full forwards
    losses, grads = train_lm_steps(model, 8)
    assert grads and all(n.startswith("prompt_encoder.default.") for n in grads)
    assert losses[-1] < losses[0]


# Encoder-decoder (T5): peft puts the prefixes in the decoder's self-attention. Its 4-rows-per-layer layout
# maps decoder layer i to saved rows 4i, 4i+1 (mod 2L); an odd layer count checks that mapping too.
@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_seq2seq_checkpoints_both_ways(layers, projection, direction, tmp_path):
    kwargs = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, prefix_projection=projection, encoder_hidden_size=16)
    source, target = _round_trip(direction, lambda: _t5(layers), kwargs, tmp_path)
    inputs = t5_inputs()
    inputs["decoder_attention_mask"] = torch.ones_like(inputs["decoder_input_ids"])
    inputs["decoder_attention_mask"][1, 3:] = 0  # padded decoder positions: the prefix columns stay visible
    labels = text_inputs(seq=5, seed=7)["input_ids"]
    with torch.no_grad():
        want, got = (m(**inputs, labels=labels) for m in (source, target))
        plain = _t5(layers)(**inputs).logits
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)
    assert (got.logits - plain).abs().max() > 1e-3
    assert target.peft_config["default"].num_transformer_submodules == 2


def test_seq2seq_generate_is_greedy_decoding_and_training_lowers_the_loss():
    model = dt.get_peft_model(tiny_t5(), dt.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    perturb_trainable(model, 6, 2.0)
    inputs = text_inputs(batch=2, seq=6)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None)
    dec = greedy_seq2seq_reference(model, inputs, 4)
    assert torch.equal(out, dec) and not torch.equal(dec[0], dec[1])
    # (peft 0.21's own seq2seq prefix generate gives the same tokens for both rows here: it departs from its forward)
    labels = text_inputs(seq=5, seed=7)["input_ids"]
    losses, grads = train_steps(model, {**inputs, "labels": labels}, 8, lr=0.05)
    assert grads == {"prompt_encoder.default.embedding.weight"} and losses[-1] < losses[0]


# Classifiers (BERT, GPT-2): with transformers 5 peft 0.21 cannot run this forward itself (it looks for a
# `past_key_values` argument, now called `cache`), so the reference is what its forward does: the base model
# called with peft's own prefix cache and an attention mask with n leading ones.
def _peft_reference(peft_model, inputs):
    batch = inputs["input_ids"].shape[0]
    mask = torch.cat([torch.ones(batch, peft_model.peft_config["default"].num_virtual_tokens, dtype=torch.long),
                      inputs["attention_mask"]], dim=1)
    return peft_model.base_model(**{**inputs, "attention_mask": mask}, cache=peft_model.get_prompt(batch))


@pytest.mark.parametrize("build", [tiny_bert_cls, tiny_gpt2_cls], ids=["bert", "gpt2"])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_sequence_classification_checkpoints_both_ways(build, direction, tmp_path):
    kwargs = dict(task_type="SEQ_CLS", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16)
    source, target = _round_trip(direction, build, kwargs, tmp_path)
    ours, theirs = (source, target) if direction == "deltatune->peft" else (target, source)
    inputs, labels = text_inputs(), torch.tensor([0, 2])
    inputs["attention_mask"][1, 5:] = 0
    with torch.no_grad():
        want = _peft_reference(theirs, {**inputs, "labels": labels})
        got = ours(**inputs, labels=labels)
        plain = build()(**inputs).logits
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)
    assert (got.logits - plain).abs().max() > 1e-3


def test_encoder_padding_is_masked_and_only_prefix_and_head_train():
    model = dt.get_peft_model(tiny_bert_cls(), dt.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    perturb_trainable(model, 8, 0.5)
    inputs = text_inputs(batch=1, seq=7)
    padded = {"input_ids": torch.cat([inputs["input_ids"], torch.zeros(1, 3, dtype=torch.long)], dim=1),
              "attention_mask": torch.cat([inputs["attention_mask"], torch.zeros(1, 3, dtype=torch.long)], dim=1)}
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits, model(**inputs).logits, rtol=0, atol=1e-5)
    assert_prompt_and_head_train(model)


def test_token_classification_keeps_one_output_per_input_token():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    base = BertForTokenClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=64, num_labels=5)).eval()
    plain = base(**text_inputs()).logits
    model = dt.get_peft_model(base, dt.PrefixTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=3))
    perturb_trainable(model, 9, 0.5)
    with torch.no_grad():
        out = model(**text_inputs(), labels=torch.zeros(2, 7, dtype=torch.long))
    assert out.logits.shape == plain.shape == (2, 7, 5) and (out.logits - plain).abs().max() > 1e-3
    assert torch.isfinite(out.loss)


def test_models_without_a_cache_are_refused_clearly():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    model.get_input_embeddings = lambda: model[0]
    with pytest.raises(ValueError, match="key/value cache"):
        dt.get_peft_model(model, dt.PrefixTuningConfig(num_virtual_tokens=2))
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4,
                                                                  hidden_dim=64))
    with pytest.raises(ValueError, match="DistilBertForSequenceClassification has none"):
        dt.get_peft_model(distil, dt.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    assert not any("prompt_encoder" in n for n, _ in distil.named_modules())


def _bart(decoder_layers=3, decoder_heads=2):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=decoder_layers, encoder_attention_heads=4,
        decoder_attention_heads=decoder_heads, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)).eval()


def test_bart_with_a_decoder_unlike_its_encoder(tmp_path):
    """deltatune sizes the prefixes from the decoder (3 layers, 2 heads here); peft 0.21 records the encoder's
    sizes, so its adapter for this model cannot run: loading it is refused by name, the model untouched."""
    _, target = _round_trip("deltatune->peft", _bart, dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3), tmp_path / "a")
    source = dt.PeftModel.from_pretrained(_bart(), str(tmp_path / "a"))
    inputs = t5_inputs()
    with torch.no_grad():
        torch.testing.assert_close(source(**inputs).logits, target(**inputs).logits, rtol=0, atol=1e-5)
    theirs = peft.get_peft_model(_bart(), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    theirs.save_pretrained(str(tmp_path / "b"))
    base = _bart()
    before = _observable_state(base)
    with pytest.raises(ValueError, match=r"num_attention_heads=4 \(the model has 2\), num_layers=2 \(the model has 3\)"):
        dt.PeftModel.from_pretrained(base, str(tmp_path / "b"))
    after = _observable_state(base)
    assert [n for n, _ in after["modules"]] == [n for n, _ in before["modules"]]
    assert all(a is b for (_, a), (_, b) in zip(after["modules"], before["modules"]))
    assert after["attributes"] == before["attributes"]  # nothing stashed on any module
    assert [n for n, _ in after["params"]] == [n for n, _ in before["params"]]
    for (name, p), (_, q) in zip(after["params"], before["params"]):
        assert p is q and p.requires_grad == before["requires_grad"][name], name
        assert torch.equal(p, before["values"][name]), name
    assert torch.equal(after["outputs"], before["outputs"])


def _observable_state(model):
    """The model's modules, attributes and parameters (object, trainability, value), and its output."""
    with torch.no_grad():
        outputs = model(**t5_inputs()).logits
    params = list(model.named_parameters())
    return dict(
        modules=list(model.named_modules()),
        attributes={n: sorted(vars(m)) for n, m in model.named_modules()},
        params=params,
        requires_grad={n: p.requires_grad for n, p in params},
        values={n: p.detach().clone() for n, p in params},
        outputs=outputs,
    )
