"""Saves killed at random moments leave the previous complete adapter or the new one, never a mix.

``dist_scripts/kill_saves.py`` forks saving children and SIGKILLs them (``KILLS`` times per mode); the
other tests here check :func:`deltatune.fileio.staged_folder` (the folder-level atomic write under every
adapter save) directly: failures, kept entries, symlinks and the file-by-file fallback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltatune import fileio

SCRIPT = Path(__file__).parent / "dist_scripts" / "kill_saves.py"
KILLS = 40


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    out = tmp_path_factory.mktemp("kills")
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "single,multi,whole", str(KILLS), "0"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return {r["mode"]: r for r in map(json.loads, done.stdout.splitlines())}


@pytest.mark.parametrize("mode", ["single", "multi", "whole"])
def test_killed_saves_leave_a_complete_adapter(killed, mode):
    result = killed[mode]
    assert result["kills"] == KILLS
    assert result["mixes"] == []
    for counts in result["seen"].values():  # kills landed before and after the saves completed
        assert counts["0"] >= 5 and counts["1"] >= 5, counts
    # abandoned staging folders are removed by the next save: at most the last kill's remain (two nested in "whole")
    assert result["leftover_staging"] <= (2 if mode == "whole" else 1)


def test_whole_folder_saves_never_mix_adapter_versions(killed):
    # save_pretrained writes each adapter in its own step, so a kill between two adapters can leave one
    # adapter new and the other old (each complete; counted in killed["multi"]). checkpoint.save_adapters
    # writes the whole folder in one step: that never happens.
    assert killed["whole"]["adapters_of_different_versions"] == 0


def test_save_adapters_writes_what_save_pretrained_writes(tmp_path):
    import torch

    import deltatune as dt
    from conftest import tiny_llama

    torch.manual_seed(0)
    config = dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    model = dt.get_peft_model(tiny_llama(), config)
    model.add_adapter("other", config.replace(r=3))
    model.save_pretrained(str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("the user's")  # kept
    adapters = [(n, c.replace(inference_mode=True), None) for n, c in model.peft_config.items()]
    dt.checkpoint.save_adapters(model, str(tmp_path / "b"), adapters)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert b.pop("notes.txt") == b"the user's" and a == b
    assert sorted(a) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                         "other/adapter_config.json", "other/adapter_model.safetensors"]


def _tree_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_staged_folder_keeps_other_entries_and_replaces_named_ones(tmp_path):
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text("old a")
    (folder / "keep.txt").write_text("kept")
    (folder / "sub" / "x").write_text("x")
    with fileio.staged_folder(str(folder), replaced=["a.json"]) as staged:
        assert not os.path.exists(os.path.join(staged, "a.json"))
        Path(staged, "a.json").write_text("new a")
        assert _tree(folder)["a.json"] == "old a"  # nothing visible before the block ends
    assert _tree(folder) == {"a.json": "new a", "keep.txt": "kept", "sub/x": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the old version is gone


def test_staged_folder_failure_leaves_folder_as_it_was(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "a.json").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with fileio.staged_folder(str(folder), replaced=["a.json"]) as staged:
            Path(staged, "a.json").write_text("half")
            raise RuntimeError("boom")
    assert _tree(folder) == {"a.json": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_staged_folder_new_folder_and_symlink(tmp_path):
    real = tmp_path / "real"
    with fileio.staged_folder(str(real)) as staged:
        Path(staged, "f").write_text("1")
    assert _tree(real) == {"f": "1"}
    link = tmp_path / "link"
    link.symlink_to(real)
    with fileio.staged_folder(str(link), replaced=["f"]) as staged:
        Path(staged, "f").write_text("2")
    assert link.is_symlink() and _tree(real) == {"f": "2"}


def test_staged_folder_without_exchange_moves_files_in(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)  # e.g. macOS, or a file system without it
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "a").write_text("old")
    (folder / "sub" / "b").write_text("old b")
    with fileio.staged_folder(str(folder), replaced=["a"]) as staged:
        Path(staged, "a").write_text("new")
        Path(staged, "sub", "b").write_text("new b")
    assert _tree(folder) == {"a": "new", "sub/b": "new b"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_staged_folder_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a").write_text("old")
    with fileio.staged_folder(".", replaced=["a"]) as staged:
        Path(staged, "a").write_text("new")
    assert os.path.samefile(os.getcwd(), tmp_path)  # still in a folder that exists
    assert Path("a").read_text() == "new"
