"""``deltatune train/ab --method oft|vera`` on the embedded MiniLM-L6 (a tiny slice of the bundled data), the
settings a label brings (``method_labels.LABEL_DEFAULTS``) and ``ab``'s per-method table.

Trainable-parameter counts are checked against the methods' formulas over the default targets (query, key,
value, attention.output.dense, intermediate.dense, output.dense) plus the classification head, for MiniLM-L6
(6 layers, width 384, feed-forward 1536) and, in the ``ab`` test, a tiny BERT (2 layers, 32, 64).
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from deltatune.cli import build_parser, main
from deltatune.cli.data import BUNDLED_TEST, BUNDLED_TRAIN, read_rows
from deltatune.cli.method_labels import LABEL_DEFAULTS, OFT_BLOCK_SIZE
from deltatune.cli.options import given_options, resolve
from deltatune.cli.train import embedded_model_dir

MINILM, TINY = (6, 384, 1536), (2, 32, 64)  # (layers, width, feed-forward width)
LABELS = 5
N_TARGETS = 6


def _targets(width: int, ffn: int) -> list[tuple[int, int]]:
    """(input, output) of each default target in one layer."""
    return [(width, width)] * 4 + [(width, ffn), (ffn, width)]


def head_params(model=MINILM) -> int:
    return model[1] * LABELS + LABELS


def oft_params(block: int, model=MINILM) -> int:
    """OFT: per layer, ``in / b`` blocks, each a skew-symmetric ``b x b`` matrix stored as its
    ``b (b - 1) / 2`` upper entries."""
    layers, width, ffn = model
    return layers * sum(fan_in // block * block * (block - 1) // 2 for fan_in, _ in _targets(width, ffn)) \
        + head_params(model)


def vera_params(r: int, model=MINILM) -> int:
    """VeRA: per layer ``lambda_d`` (r) and ``lambda_b`` (out); the projections are frozen and shared."""
    layers, width, ffn = model
    return layers * sum(r + fan_out for _, fan_out in _targets(width, ffn)) + head_params(model)


@pytest.fixture(scope="module")
def tiny_slice(tmp_path_factory):
    """20 training and 10 held-out rows of the bundled data (every intent in both)."""
    root = tmp_path_factory.mktemp("slice")
    for name, source, n in (("train.jsonl", BUNDLED_TRAIN, 20), ("test.jsonl", BUNDLED_TEST, 10)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in read_rows(source)[:n]))
    return root


def _train(tiny_slice, output, *extra):
    args = ["train", "--data", str(tiny_slice / "train.jsonl"), "--test-data", str(tiny_slice / "test.jsonl"),
            "--epochs", "1", "--batch-size", "10", "--max-length", "16", "--threads", "1", "--no-baseline",
            "--output", str(output), *extra]
    assert main(args) == 0
    return json.loads((output / "metrics.json").read_text()), json.loads((output / "config.json").read_text())


def _options(*argv):
    args = build_parser().parse_args(list(argv))
    return resolve(args, given_options(args))


def test_oft_on_minilm(tiny_slice, tmp_path):
    output = tmp_path / "oft"
    metrics, _ = _train(tiny_slice, output, "--method", "oft")
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["oft_block_size"] == OFT_BLOCK_SIZE and config["r"] == 0
    assert metrics["adapter"]["trainable_params"] == oft_params(OFT_BLOCK_SIZE) == 323_333
    weights = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    rotations = {k: v for k, v in weights.items() if "oft_R" in k}
    assert len(rotations) == MINILM[0] * N_TARGETS
    assert all(v.abs().max() > 0 for v in rotations.values())  # they start at 0 (R = I): training moved them
    # merging checks the merged model against the adapter's outputs (1e-5) and fails the command otherwise
    assert main(["merge", str(output), "--output", str(tmp_path / "merged")]) == 0


def test_vera_on_minilm_takes_its_label_settings(tiny_slice, tmp_path):
    output = tmp_path / "vera"
    metrics, recorded = _train(tiny_slice, output, "--method", "vera")
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    settings = LABEL_DEFAULTS["vera"]
    assert config["peft_type"] == "VERA" and config["r"] == settings["r"] and config["save_projection"] is False
    assert recorded["r"] == settings["r"] and recorded["lr"] == settings["lr"]  # repeatable with --config
    assert metrics["adapter"]["trainable_params"] == vera_params(settings["r"])
    weights = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    assert not any("vera_A" in k or "vera_B" in k for k in weights)  # regenerated from projection_prng_key
    lambda_b = [v for k, v in weights.items() if "vera_lambda_b" in k]
    assert len(lambda_b) == MINILM[0] * N_TARGETS and all(v.abs().max() > 0 for v in lambda_b)  # start at 0
    assert main(["merge", str(output), "--output", str(tmp_path / "merged")]) == 0


def test_label_settings_fill_only_what_is_not_given(tmp_path):
    vera = LABEL_DEFAULTS["vera"]
    o = _options("train", "--method", "vera")
    assert (o.r, o.lr) == (vera["r"], vera["lr"])
    o = _options("train", "--method", "vera", "--lr", "2e-3")
    assert (o.r, o.lr) == (vera["r"], 2e-3)  # a flag wins
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"r": 16}))
    o = _options("train", "--method", "vera", "--config", str(config))
    assert (o.r, o.lr) == (16, vera["lr"])  # so does the config file
    assert (_options("train").r, _options("train").lr) == (8, 5e-4)  # lora: the plain defaults
    o = _options("ab", "--methods", "lora", "vera", "ia3", "--lr", "1e-3")
    assert (o.r, o.lr) == (8, 1e-3)  # shared by every arm
    assert o.label_settings == {"vera": {"r": vera["r"]}}  # only what no flag set, per label


def test_label_settings_cannot_come_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"label_settings": {"lora": {"lr": 1.0}}}))
    assert main(["ab", "--config", str(config), "--output", str(tmp_path / "ab")]) == 2
    assert "unknown option(s) ['label_settings']" in capsys.readouterr().err
    assert not (tmp_path / "ab").exists()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import AutoTokenizer

    from conftest import cli_bert

    folder = tmp_path_factory.mktemp("bert")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    cli_bert(tokenizer.vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_ab_compares_any_methods(tiny_slice, tiny_bert, tmp_path):
    output = tmp_path / "ab"
    args = ["ab", "--model", str(tiny_bert), "--methods", "oft", "vera", "--seeds", "0", "1",
            "--data", str(tiny_slice / "train.jsonl"),
            "--test-data", str(tiny_slice / "test.jsonl"), "--epochs", "1", "--batch-size", "10",
            "--max-length", "16", "--threads", "1", "--output", str(output)]
    assert main(args) == 0
    lines = (output / "ab.md").read_text().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "arm", "accuracy (mean +- std, 2 seeds)", "trainable params", "adapter size", "step time", "train time"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    vera = LABEL_DEFAULTS["vera"]
    assert set(rows) == {"head-only", "oft", f"vera (r {vera['r']}, lr {vera['lr']:g})"}
    assert rows["oft"][2] == f"{oft_params(OFT_BLOCK_SIZE, TINY):,}"
    assert rows["head-only"][2] == f"{head_params(TINY):,}"
    assert rows[f"vera (r {vera['r']}, lr {vera['lr']:g})"][2] == f"{vera_params(vera['r'], TINY):,}"
    results = json.loads((output / "ab.json").read_text())["results"]
    for arm in ("head-only", "oft", "vera"):
        assert len(results[arm]["metric"]) == 2 and all(0 < s < t for s, t in zip(results[arm]["step_seconds"],
                                                                                  results[arm]["seconds"]))
    assert results["vera"]["bytes"][0] < results["oft"]["bytes"][0]
