"""``deltatune merge`` output served by ``deltatune serve --model``: the merged folder keeps the base's
sentence-transformers files (pooling, normalisation) and its classification head, so it serves what the
base + adapter served."""

from __future__ import annotations

import json
import os

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_serve import LABELS, TEXTS, classify, embed, minilm_dir, offline, running, save_adapter  # noqa: E402

from deltatune.cli.merge import copy_sentence_transformers_files, merge_command  # noqa: E402
from deltatune.serve import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A run folder (adapter + class names), its offline outputs and its merged model folder."""
    base = tmp_path_factory.mktemp("merge")
    run = base / "run"
    save_adapter(str(run / "adapter"), seed=11)
    (run / "metrics.json").write_text(json.dumps({"dataset": {"labels": LABELS}}))
    merge_command(str(run), str(base / "merged"), model_override=minilm_dir())
    return base / "merged", offline(str(run / "adapter"), TEXTS)


def test_merged_folder_keeps_the_sentence_transformers_files(merged):
    folder, _ = merged
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 os.path.join("1_Pooling", "config.json")):
        with open(os.path.join(minilm_dir(), name)) as want, open(folder / name) as got:
            assert json.load(got) == json.load(want), name


def test_merged_encoder_serves_the_embeddings_and_classes_of_base_plus_adapter(merged):
    folder, (want_emb, want_probs) = merged
    with running(ServeConfig(model=str(folder))) as (url, server), httpx.Client(base_url=url, timeout=30) as client:
        assert server.name == "merged"
        emb, _ = embed(client, "merged", TEXTS)
        torch.testing.assert_close(emb, want_emb, atol=1e-5, rtol=0)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)  # Normalize kept
        probs, r = classify(client, "merged", TEXTS)
        torch.testing.assert_close(probs, want_probs, atol=1e-5, rtol=0)
        assert [d["label"] for d in r.json()["data"]] == [LABELS[int(p.argmax())] for p in want_probs]
        assert {d["num_classes"] for d in r.json()["data"]} == {len(LABELS)}
    assert len(set(int(p.argmax()) for p in want_probs)) > 1  # the labels compared above are not all alike


def test_plain_encoder_base_still_has_no_classification_head():
    with running(ServeConfig()) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/classify", json={"model": "minilm-l6", "input": ["hello"]})
    assert r.status_code == 400 and "no classification head" in r.json()["error"]["message"]


def test_module_folders_outside_the_base_are_not_copied(tmp_path):
    base, dest = tmp_path / "base", tmp_path / "dest"
    (base / "1_Pooling").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("x")
    (base / "1_Pooling" / "config.json").write_text("{}")
    modules = [{"path": ""}, {"path": "1_Pooling"}, {"path": "../secret"}, {"path": str(tmp_path / "secret")},
               {"path": "2_Normalize"}]
    (base / "modules.json").write_text(json.dumps(modules))
    dest.mkdir()
    assert copy_sentence_transformers_files(str(base), str(dest)) == ["modules.json", "1_Pooling"]
    assert sorted(os.listdir(dest)) == ["1_Pooling", "modules.json"]
