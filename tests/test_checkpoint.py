"""Bad checkpoints get clear errors and leave model and files unchanged; saves are atomic."""

from __future__ import annotations

import os
import pickle

import peft
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from conftest import main_output, text_inputs, tiny_llama
from deltatune.methods.lora import LoraLayer


def _mlp(width=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4)).eval()


def _saved(tmp_path, width=16, **kwargs):
    model = dt.get_peft_model(_mlp(width), dt.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False, **kwargs))
    path = str(tmp_path / "adapter")
    model.save_pretrained(path)
    return model, path


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    modules, state = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_shape_mismatch_names_key_and_shapes_and_changes_nothing(tmp_path):
    _, path = _saved(tmp_path, width=16)
    target = _mlp(width=32)
    snap = _snapshot(target)
    with pytest.raises(dt.CheckpointError) as info:
        dt.PeftModel.from_pretrained(target, path)
    message = str(info.value)
    assert "base_model.model.0.lora_B.weight" in message and "(16, 2)" in message and "(32, 2)" in message
    _assert_unchanged(target, snap)


def test_load_adapter_failure_removes_only_the_new_adapter(tmp_path):
    _, path = _saved(tmp_path, width=16)
    model = dt.get_peft_model(_mlp(width=32), dt.LoraConfig(r=2, target_modules=["2"]))
    snap = _snapshot(model)
    with pytest.raises(dt.CheckpointError, match="shape"):
        model.load_adapter(path, "other")
    assert list(model.peft_config) == ["default"]
    _assert_unchanged(model, snap)


def test_unknown_key_is_an_error(tmp_path):
    _, path = _saved(tmp_path)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    tensors["base_model.model.9.lora_A.weight"] = torch.zeros(2, 8)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    target = _mlp()
    snap = _snapshot(target)
    with pytest.raises(dt.CheckpointError, match=r"9\.lora_A\.weight"):
        dt.PeftModel.from_pretrained(target, path)
    _assert_unchanged(target, snap)


def test_missing_keys_warn(tmp_path):
    _, path = _saved(tmp_path)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    del tensors["base_model.model.2.lora_B.weight"]
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with pytest.warns(UserWarning, match=r"2\.lora_B\.weight"):
        dt.PeftModel.from_pretrained(_mlp(), path)


def test_truncated_file_is_a_clear_error(tmp_path):
    _, path = _saved(tmp_path)
    file = os.path.join(path, "adapter_model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    target = _mlp()
    snap = _snapshot(target)
    with pytest.raises(dt.CheckpointError, match="truncated or corrupt"):
        dt.PeftModel.from_pretrained(target, path)
    _assert_unchanged(target, snap)
    open(file, "wb").write(b"garbage")
    with pytest.raises(dt.CheckpointError, match="truncated or corrupt"):
        dt.PeftModel.from_pretrained(target, path)


def test_missing_files_and_folders(tmp_path):
    _, path = _saved(tmp_path)
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        dt.PeftModel.from_pretrained(_mlp(), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dt.PeftModel.from_pretrained(_mlp(), str(tmp_path / "nowhere"))


def test_hub_id_offline_says_it_could_not_be_fetched(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = _mlp()
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hugging Face Hub"):
        dt.PeftModel.from_pretrained(target, "some-user/some-adapter")
    assert not any(isinstance(m, LoraLayer) for m in target.modules())


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_adapters_load_only_with_weights_only(tmp_path):
    model, path = _saved(tmp_path)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    torch.save(tensors, os.path.join(path, "adapter_model.bin"))
    loaded = dt.PeftModel.from_pretrained(_mlp(), path)
    x = torch.randn(2, 8)
    torch.testing.assert_close(loaded(x), model(x))
    with open(os.path.join(path, "adapter_model.bin"), "wb") as fh:
        pickle.dump({"x": _Evil()}, fh)
    with pytest.raises(dt.CheckpointError, match="weights_only"):
        dt.PeftModel.from_pretrained(_mlp(), path)


def test_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    file = os.path.join(path, "adapter_model.safetensors")
    good = open(file, "rb").read()

    def broken_save(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    assert open(file, "rb").read() == good  # the previous adapter is intact
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    fresh = str(tmp_path / "fresh")
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(fresh)
    assert not os.path.exists(os.path.join(fresh, "adapter_model.safetensors"))
    assert not any(name.startswith(".tmp") for name in os.listdir(fresh))


def test_save_refuses_pickle_and_files(tmp_path):
    model, path = _saved(tmp_path)
    with pytest.raises(ValueError, match="safetensors"):
        model.save_pretrained(str(tmp_path / "x"), safe_serialization=False)
    file = tmp_path / "a_file"
    file.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(str(file))


def test_key_mapping_renames_file_keys_as_peft_does(tmp_path):
    source = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    path = str(tmp_path / "renamed")
    source.save_pretrained(path)
    file = os.path.join(path, "adapter_model.safetensors")
    save_file({k.replace(".model.layers.", ".decoder.blocks."): v for k, v in load_file(file).items()}, file)
    with pytest.raises(dt.CheckpointError, match="decoder"):
        dt.PeftModel.from_pretrained(tiny_llama(), path)
    mapping = {r"^decoder\.blocks\.(\d+)": r"model.layers.\1"}
    ours = dt.PeftModel.from_pretrained(tiny_llama(), path, key_mapping=mapping)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), path, key_mapping=mapping)
    inputs = text_inputs()
    want = main_output(source.eval()(**inputs))
    torch.testing.assert_close(main_output(ours(**inputs)), want, rtol=0, atol=0)
    torch.testing.assert_close(main_output(theirs(**inputs)), want, rtol=1e-6, atol=1e-6)
    ours.load_adapter(path, "again", key_mapping=mapping)
    with pytest.raises(ValueError, match="not a regular expression"):
        ours.load_adapter(path, "bad", key_mapping={"(": "x"})
    assert list(ours.peft_config) == ["default", "again"]


def test_unknown_keyword_arguments_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    target = _mlp()
    snap = _snapshot(target)
    with pytest.raises(TypeError, match="torch_dtype"):
        dt.PeftModel.from_pretrained(target, path, torch_dtype=torch.float16)
    _assert_unchanged(target, snap)
    model = dt.PeftModel.from_pretrained(target, path, ephemeral_gpu_offload=True, local_files_only=True)
    with pytest.raises(TypeError, match="adapter_nmae"):
        model.load_adapter(path, "other", adapter_nmae="x")


def test_save_writes_a_model_card_and_keeps_an_existing_one(tmp_path):
    """As peft: README.md with Hub metadata naming the base model and library_name peft; a card already in
    the folder (the user's) is left untouched."""
    import yaml

    base = tiny_llama()
    base.config.name_or_path = "org/tiny-llama"
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "org/tiny-llama" and meta["library_name"] == "peft"
    assert "base_model:adapter:org/tiny-llama" in meta["tags"] and "lora" in meta["tags"]
    (tmp_path / "README.md").write_text("mine")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "mine"


def test_torch_device_and_active_peft_config(tmp_path):
    """peft's ``torch_device=`` (where the file's tensors are read to) and ``active_peft_config``."""
    from deltatune import checkpoint as ckpt

    model, path = _saved(tmp_path)
    assert all(t.is_meta for t in ckpt.read_adapter(path, torch_device="meta").weights.values())
    loaded = dt.PeftModel.from_pretrained(_mlp(16), path, torch_device="cpu")
    loaded.load_adapter(path, "second", torch_device="cpu")
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert loaded.active_peft_config is loaded.peft_config["default"]
    loaded.set_adapter("second")
    assert loaded.active_peft_config is loaded.peft_config["second"]
    with pytest.raises(TypeError, match="unexpected keyword"):
        dt.PeftModel.from_pretrained(_mlp(16), path, torch_devce="cpu")
