"""Kill saving processes at random moments and check what each kill left in the folder.

Usage: ``python kill_saves.py OUT MODES KILLS SEED`` with MODES a comma-separated list of

- ``single``: ``save_pretrained(dir, selected_adapters=["default"])``;
- ``multi``: ``save_pretrained(dir)`` of two adapters (``default`` at the root, ``other`` in a sub-folder);
- ``whole``: the same two adapters through :func:`deltatune.checkpoint.save_adapters` (one atomic step for
  the whole folder), called as ``save_pretrained`` would call it.

This process imports everything and builds two versions of a model once (version 0: rank 4, version 1:
rank 8 and other values); per mode it saves version 0, then ``KILLS`` times forks a child that saves
version 1, 0, 1, ... into the folder without pause, SIGKILLs it after a random delay and reads the folder.
It prints one JSON line per mode: how many kills, how often each version was found per adapter, how often
the two adapters were of different versions, and every mix seen (an adapter whose config and weights come
from different versions or match neither, or, in ``whole`` mode, adapters of different versions).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest

import deltatune as dt  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from deltatune.checkpoint import save_adapters  # noqa: E402


def build(version: int) -> dt.PeftModel:
    torch.manual_seed(version)
    r = 4 + 4 * version
    config = dt.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                           init_lora_weights=False)
    model = dt.get_peft_model(tiny_llama(), config)
    model.add_adapter("other", config.replace(lora_alpha=3 * r))
    return model


def save(model: dt.PeftModel, folder: str, mode: str) -> None:
    if mode == "single":
        model.save_pretrained(folder, selected_adapters=["default"])
    elif mode == "multi":
        model.save_pretrained(folder)
    else:
        adapters = [(n, c.replace(inference_mode=True), None) for n, c in model.peft_config.items()]
        save_adapters(model, folder, adapters)


def read_version(folder: str, expected: list[dict]) -> object:
    """Which version the adapter in ``folder`` is (0 or 1), or a string saying how it is mixed or broken."""
    from safetensors.torch import load_file

    try:
        with open(os.path.join(folder, "adapter_config.json")) as fh:
            config = json.load(fh)
        weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
    except Exception as exc:  # a missing or unreadable file counts as a broken folder
        return f"unreadable: {type(exc).__name__}: {exc}"
    by_config = [v for v, e in enumerate(expected) if e["config"] == config]
    by_weights = [v for v, e in enumerate(expected)
                  if e["weights"].keys() == weights.keys() and all(torch.equal(e["weights"][k], weights[k]) for k in weights)]
    if by_config and by_config == by_weights:
        return by_config[0]
    return f"mix: config of version {by_config}, weights of version {by_weights}"


def snapshot(folder: str) -> dict:
    from safetensors.torch import load_file

    with open(os.path.join(folder, "adapter_config.json")) as fh:
        config = json.load(fh)
    return {"config": config, "weights": load_file(os.path.join(folder, "adapter_model.safetensors"))}


def main(out: str, mode: str, kills: int, seed: int, models: list) -> dict:
    out = os.path.join(out, mode)
    names = ["default"] if mode == "single" else ["default", "other"]
    expected = {}
    for version, model in enumerate(models):  # what each version's complete folders hold
        ref = os.path.join(out, f"version{version}")
        model.save_pretrained(ref)
        expected[version] = {n: snapshot(ref if n == "default" else os.path.join(ref, n)) for n in names}
    folder = os.path.join(out, "adapter")
    save(models[0], folder, mode)
    start = time.perf_counter()
    save(models[1], os.path.join(out, "timing"), mode)
    one_save = time.perf_counter() - start
    rng = random.Random(seed)
    seen: dict[str, dict[str, int]] = {n: {"0": 0, "1": 0} for n in names}
    mixes, different = [], 0
    for kill in range(kills):
        pid = os.fork()
        if pid == 0:  # the child: save version 1, 0, 1, ... until killed
            try:
                version = 1
                while True:
                    save(models[version], folder, mode)
                    version = 1 - version
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0, 8 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        versions = {n: read_version(folder if n == "default" else os.path.join(folder, n), [expected[0][n], expected[1][n]])
                    for n in names}
        for name, version in versions.items():
            if isinstance(version, int):
                seen[name][str(version)] += 1
            else:
                mixes.append(f"kill {kill}, adapter {name!r}: {version}")
        if len(set(map(str, versions.values()))) > 1:
            different += 1
            if mode == "whole":
                mixes.append(f"kill {kill}: adapters of different versions {versions}")
    leftovers = [e for e in os.listdir(out) if "deltatune-staging" in e] + \
        [e for e in os.listdir(folder) if "deltatune-staging" in e]
    return {"mode": mode, "kills": kills, "seen": seen, "adapters_of_different_versions": different, "mixes": mixes,
            "one_save_s": one_save, "leftover_staging": len(leftovers)}


if __name__ == "__main__":
    torch.set_num_threads(1)  # (children are forked: no thread pools to inherit in a half state)
    built = [build(0), build(1)]
    for mode_name in sys.argv[2].split(","):
        print(json.dumps(main(sys.argv[1], mode_name, int(sys.argv[3]), int(sys.argv[4]), built)), flush=True)
