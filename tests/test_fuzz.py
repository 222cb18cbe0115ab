"""Property-based tests (hypothesis, derandomized: the same cases every run).

- Random valid LoRA/DoRA and IA3 configs on a tiny Llama either work end to end (inject, forward,
  backward, save, load in deltatune and in peft, merge, unmerge) or are refused when the config or the
  model is built, with a ValueError/TypeError that says what is wrong.
- Random damage to a saved ``adapter_config.json`` (wrong types, missing and unknown fields, huge numbers,
  other methods' fields) gives a clear error (or loads a working adapter) and leaves the base as it was.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltatune as dt
from conftest import tiny_llama

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROBE = torch.arange(3, 11).unsqueeze(0)
#: Errors a user can act on; anything else (IndexError, AttributeError, ZeroDivisionError, a RuntimeError
#: from deep inside torch) escaping a bad input counts as a failure.
CLEAR_ERRORS = (ValueError, TypeError)
CASES = 30
SETTINGS = settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

targets = st.lists(st.sampled_from(LINEARS), min_size=1, max_size=4, unique=True)


@st.composite
def lora_configs(draw):
    kwargs = dict(
        r=draw(st.integers(1, 8)), lora_alpha=draw(st.sampled_from([1, 4, 8, 16.5])), target_modules=draw(targets),
        lora_dropout=draw(st.sampled_from([0.0, 0.1])), bias=draw(st.sampled_from(["none", "all", "lora_only"])),
        use_rslora=draw(st.booleans()), use_dora=draw(st.booleans()),
        init_lora_weights=draw(st.sampled_from([False, "gaussian"])),  # (B = 0 would hide wrong merges)
        layers_to_transform=draw(st.sampled_from([None, [0], [1], [0, 1]])),
    )
    return dt.LoraConfig(task_type="CAUSAL_LM", **kwargs)


@st.composite
def ia3_configs(draw):
    chosen = draw(targets)
    feedforward = draw(st.lists(st.sampled_from(chosen), unique=True))
    return dt.IA3Config(task_type="CAUSAL_LM", target_modules=chosen, feedforward_modules=feedforward,
                        init_ia3_weights=False)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def _end_to_end(config, folder) -> None:
    import peft

    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), config)
    model.train()
    model(input_ids=PROBE, labels=PROBE).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    want = _logits(model)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(str(folder))
    ours = dt.PeftModel.from_pretrained(tiny_llama(), str(folder))
    torch.testing.assert_close(_logits(ours), want, rtol=0, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
    torch.testing.assert_close(_logits(theirs), want, rtol=0, atol=1e-4)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.merge_adapter()
    torch.testing.assert_close(_logits(ours), want, rtol=0, atol=1e-4)
    ours.unmerge_adapter()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, base[k], rtol=0, atol=1e-5)


def _works_or_refused(build_config, folder) -> str:
    try:
        config = build_config()
        dt.get_peft_model(tiny_llama(), config)
    except CLEAR_ERRORS as exc:
        assert str(exc), "an error without a message"
        return "refused"
    _end_to_end(config, folder)
    return "worked"


OUTCOMES: dict[str, dict[str, int]] = {"lora": {}, "ia3": {}, "config_json": {}}


@SETTINGS
@given(config=lora_configs())
def test_random_lora_configs(config, tmp_path):
    outcome = _works_or_refused(lambda: config, tmp_path / "adapter")
    OUTCOMES["lora"][outcome] = OUTCOMES["lora"].get(outcome, 0) + 1


@SETTINGS
@given(config=ia3_configs())
def test_random_ia3_configs(config, tmp_path):
    outcome = _works_or_refused(lambda: config, tmp_path / "adapter")
    OUTCOMES["ia3"][outcome] = OUTCOMES["ia3"].get(outcome, 0) + 1


BAD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.just(10**30), st.just(2**31),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                       st.lists(st.integers(-2, 2), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FIELDS = ["r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "use_dora", "init_lora_weights",
          "layers_to_transform", "rank_pattern", "alpha_pattern", "modules_to_save", "peft_type", "task_type",
          "fan_in_fan_out", "exclude_modules", "layers_pattern"]
OTHER_METHODS = {"feedforward_modules": ["down_proj"], "num_virtual_tokens": 20, "target_r": 4, "init_r": 12,
                 "encoder_hidden_size": 16, "rank_dropout": 0.1}


@st.composite
def damaged_configs(draw):
    changes = draw(st.dictionaries(st.sampled_from(FIELDS), BAD_VALUES, min_size=1, max_size=3))
    removed = draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True))
    extra = draw(st.dictionaries(st.sampled_from(sorted(OTHER_METHODS) + ["zzz_unknown"]), st.just(None), max_size=2))
    return changes, removed, {k: OTHER_METHODS.get(k, 1) for k in extra}


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                      ).save_pretrained(str(folder))
    return folder


@settings(SETTINGS, max_examples=3 * CASES)
@given(damage=damaged_configs())
def test_damaged_adapter_config_json(damage, good_adapter, tmp_path):
    changes, removed, extra = damage
    folder = tmp_path / "damaged"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(good_adapter, folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    data.update(changes)
    for key in removed:
        data.pop(key, None)
    data.update(extra)
    (folder / "adapter_config.json").write_text(json.dumps(data))
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    try:
        model = dt.PeftModel.from_pretrained(base, str(folder))
    except CLEAR_ERRORS as exc:
        assert str(exc), "an error without a message"
        after = base.state_dict()  # a refused load leaves the base as it was
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        outcome = "refused"
    else:
        logits = _logits(model)  # it runs; outputs are finite unless the file asks for an absurd scaling
        alpha = getattr(model.peft_config["default"], "lora_alpha", 1)
        if isinstance(alpha, (int, float)) and math.isfinite(alpha) and abs(alpha) <= 1e4:
            assert torch.isfinite(logits).all()
        outcome = "loaded"
    OUTCOMES["config_json"][outcome] = OUTCOMES["config_json"].get(outcome, 0) + 1


@pytest.mark.parametrize("field, value, error", [
    ("rank_pattern", None, "rank_pattern must be a dict"),  # found by the property above: was an AttributeError
    ("r", 2**31, "r=2147483648"),  # found by the property above: was a failed 256 GB allocation
    ("lora_alpha", float("nan"), "must be finite"),  # JSON NaN passed the config's "> 0" check
    ("lora_alpha", float("inf"), "must be finite"),
])
def test_damaged_config_regressions(good_adapter, tmp_path, field, value, error):
    folder = tmp_path / "damaged"
    shutil.copytree(good_adapter, folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**data, field: value}))
    base = tiny_llama()
    with pytest.raises(ValueError, match=error):
        dt.PeftModel.from_pretrained(base, str(folder))
    assert not any("lora" in name for name, _ in base.named_modules())


def test_cases_ran():
    """Every property ran its cases (printed with -s: how many worked and how many were refused)."""
    print("fuzz outcomes", OUTCOMES)
    for name, counts in OUTCOMES.items():
        assert sum(counts.values()) >= (3 * CASES if name == "config_json" else CASES), (name, counts)
