"""Threads and adapters: what is safe, checked against single-threaded reference outputs.

- Two threads, each with its own model (load, set_adapter, forward): never interfere.
- One model shared for inference: a forward in one thread while another thread loads (or deletes) an
  adapter that is not active computes exactly the active adapter's outputs; this is pinned down both by a
  forward held halfway (a pre-hook on the second decoder layer waits until the load is done) and by
  hammering (many forwards against many load/delete cycles).
- One model shared, and another thread calls ``set_adapter`` during a forward: the forward mixes the two
  adapters (layers before the switch ran one, layers after it the other). Not safe: ``deltatune serve``
  runs every change to the model and every forward on one worker thread (``serve/host.py``).
"""

from __future__ import annotations

import threading

import pytest
import torch

import deltatune as dt
from conftest import tiny_llama

IDS = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(5))
CONFIGS = {
    "a": dt.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    # b also wraps modules a leaves alone, so loading it replaces layers the running forward is about to use
    "b": dt.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "up_proj", "down_proj"],
                       init_lora_weights=False),
}
TOL = 1e-6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Adapters a and b saved to folders, and each one's reference logits (computed in this thread)."""
    root = tmp_path_factory.mktemp("threads")
    tiny_llama().save_pretrained(str(root / "base"))
    refs = {}
    for name, config in CONFIGS.items():
        torch.manual_seed({"a": 1, "b": 2}[name])
        model = dt.get_peft_model(tiny_llama(), config).eval()
        model.save_pretrained(str(root / name))
        with torch.no_grad():
            refs[name] = model(input_ids=IDS).logits
    return root, refs


def _base(root):
    """The base read from its folder. transformers' ``from_pretrained`` is not thread-safe: its
    ``no_init_weights`` swaps ``torch.nn.init``'s functions for no-ops process-wide, and two calls at once
    can leave them swapped for good. So bases are loaded before threads start."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(root / "base"))


def _model(root, with_b: bool = True, base=None):
    """Base and adapters read from files: a model built with random initialisation in two threads at once
    would not be the reference's (torch's default generator is one per process, the threads' draws mix)."""
    model = dt.PeftModel.from_pretrained(_base(root) if base is None else base, str(root / "a"), adapter_name="a")
    if with_b:
        model.load_adapter(str(root / "b"), "b")
    return model


def _run_threads(*targets) -> None:
    errors = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # (reported in the main thread)
                errors.append(exc)
        return run

    threads = [threading.Thread(target=guarded(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _diff(a, b) -> float:
    return float((a - b).abs().max())


def test_threads_with_their_own_models_never_interfere(saved):
    root, refs = saved
    assert _diff(refs["a"], refs["b"]) > 1e-2  # the two adapters are told apart
    start = threading.Barrier(2)
    worst = {}

    bases = {"ab": _base(root), "ba": _base(root)}

    def worker(tag: str, order: tuple):
        model = _model(root, base=bases[tag])  # load the adapters
        start.wait()
        diffs = []
        for step in range(30):
            name = order[step % 2]
            model.set_adapter(name)
            diffs.append(_diff(_logits(model), refs[name]))
        worst[tag] = max(diffs)

    _run_threads(lambda: worker("ab", ("a", "b")), lambda: worker("ba", ("b", "a")))
    assert worst["ab"] <= TOL and worst["ba"] <= TOL, worst


def _forward_around(model, action):
    """The logits of a forward in one thread that stops between decoder layers 0 and 1 (a pre-hook on layer
    1) while another thread runs ``action()``, and resumes once it is done."""
    reached, done, out = threading.Event(), threading.Event(), {}

    def hook(module, args):
        reached.set()
        assert done.wait(60), "the other thread never finished"

    def forward():
        out["logits"] = _logits(model)

    def act():
        assert reached.wait(60)
        action()
        done.set()

    handle = model.base_model.model.model.layers[1].register_forward_pre_hook(hook)
    try:
        _run_threads(forward, act)
    finally:
        handle.remove()
    return out["logits"]


def test_loading_an_adapter_during_a_forward_on_a_shared_model(saved):
    root, refs = saved
    model = _model(root, with_b=False)
    model.set_adapter("a")
    # the load runs while the forward waits between layer 0 and layer 1
    logits = _forward_around(model, lambda: model.load_adapter(str(root / "b"), "b"))
    assert "b" in model.peft_config and model.active_adapters == ["a"]
    assert _diff(logits, refs["a"]) <= TOL
    model.set_adapter("b")
    assert _diff(_logits(model), refs["b"]) <= TOL  # b loaded whole


def test_forwards_while_another_thread_loads_and_deletes_adapters(saved):
    root, refs = saved
    model = _model(root, with_b=False)
    done = threading.Event()
    diffs, cycles = [], []

    def forwards():
        while not done.is_set() or len(diffs) < 20:
            diffs.append(_diff(_logits(model), refs["a"]))

    def loads():
        try:
            for i in range(15):
                model.load_adapter(str(root / "b"), "b")
                model.delete_adapter("b")
                cycles.append(i)
        finally:
            done.set()

    _run_threads(forwards, loads)
    assert len(cycles) == 15 and len(diffs) >= 20
    assert max(diffs) <= TOL, max(diffs)
    assert list(model.peft_config) == ["a"]


def test_set_adapter_during_a_forward_mixes_adapters(saved):
    """Not safe, and documented so: the forward ran adapter a in layer 0 and adapter b after it."""
    root, refs = saved
    model = _model(root)
    model.set_adapter("a")
    logits = _forward_around(model, lambda: model.set_adapter("b"))
    assert _diff(logits, refs["a"]) > 1e-3 and _diff(logits, refs["b"]) > 1e-3
