"""add_weighted_adapter: the pure tensor math against direct formulas, every combination type against peft
(same source adapters, built and saved by peft, loaded into both libraries), DARE's randomness, saving and
reloading the combined adapter, the cases where peft is wrong, and the refusals (model left unchanged).
"""

from __future__ import annotations

import math
import os

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import combination as C
from deltatune import injection
from deltatune.methods.lora.weighted import add_weighted_adapter
from conftest import conv_inputs, main_output, text_inputs, tiny_convnet, tiny_gpt2_lm, tiny_llama

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread for these tiny matrices: LAPACK's SVD with two threads on a busy machine is 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _out(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def _lora_layers(model):
    return dict(injection.adapter_layers(model.base_model.model))


# ================================================================================= pure functions
def test_magnitude_trim_keeps_top_fraction():
    t = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    out = C.magnitude_trim(t, 0.4)
    k = int(0.4 * 30)
    threshold = t.abs().flatten().sort(descending=True).values[k - 1]
    expected = torch.where(t.abs() >= threshold, t, torch.zeros_like(t))
    assert torch.equal(out, expected) and int((out != 0).sum()) == k
    assert torch.equal(C.magnitude_trim(t, 1.0), t)
    assert int((C.magnitude_trim(t, 0.0) != 0).sum()) == 0


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_elect_sign_and_disjoint_merge(method):
    g = torch.Generator().manual_seed(1)
    stacked = torch.randn(3, 4, 4, generator=g)
    stacked[0, 0, 0] = 0.0
    agree = C.elect_sign(stacked, method)
    merged = C.disjoint_merge(stacked * 2.0, agree)
    for i in range(4):
        for j in range(4):
            col = stacked[:, i, j].tolist()
            score = sum(col) if method == "total" else sum(math.copysign(1, v) if v else 0 for v in col)
            elected = 1.0 if score >= 0 else -1.0
            chosen = [v for v in col if v != 0 and math.copysign(1, v) == elected]
            assert agree[:, i, j].tolist() == [v != 0 and math.copysign(1, v) == elected for v in col]
            assert merged[i, j].item() == pytest.approx(2.0 * sum(chosen) / max(1, len(chosen)), abs=1e-6)


def test_frequency_and_total_differ():
    # one big positive against two small negatives: total elects +, frequency elects -
    stacked = torch.tensor([[5.0], [-1.0], [-1.0]])
    assert C.elect_sign(stacked, "total").squeeze(1).tolist() == [True, False, False]
    assert C.elect_sign(stacked, "frequency").squeeze(1).tolist() == [False, True, True]


def test_merge_rules_against_formulas():
    g = torch.Generator().manual_seed(2)
    ts, ws = [torch.randn(5, 7, generator=g) for _ in range(3)], [0.5, 1.5, 0.25]
    assert torch.allclose(C.merge("weighted_sum", ts, ws), sum(w * t for w, t in zip(ws, ts)))
    trimmed = [C.magnitude_trim(t, 0.5) for t in ts]
    assert torch.allclose(C.merge("magnitude_prune", ts, ws, 0.5), sum(w * t for w, t in zip(ws, trimmed)))
    stacked = torch.stack(trimmed)
    expected = C.disjoint_merge(torch.stack([w * t for w, t in zip(ws, trimmed)]), C.elect_sign(stacked, "total"))
    assert torch.allclose(C.merge("ties", ts, ws, 0.5), expected)


def test_dare_drop_reproducible_rescaled_and_unbiased():
    t = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    a = C.dare_drop(t, 0.3, torch.Generator().manual_seed(7))
    b = C.dare_drop(t, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    kept = a != 0
    assert torch.allclose(a[kept], t[kept] / 0.3)  # kept entries rescaled by 1/density
    assert 0.2 < kept.float().mean().item() < 0.4
    g = torch.Generator().manual_seed(8)
    mean = torch.stack([C.dare_drop(t, 0.3, g) for _ in range(3000)]).mean(0)
    assert (mean - t).norm() / t.norm() < 0.05  # E[drop(t)] = t
    assert (a - t).norm() / t.norm() > 0.5
    assert torch.equal(C.dare_drop(t, 1.0, g), t)


def test_truncated_svd_exact_best_padded_and_clamped():
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(6, 9, generator=g)
    A, B = C.truncated_svd(delta, 6)
    assert A.shape == (6, 9) and B.shape == (6, 6) and torch.allclose(B @ A, delta, atol=1e-5)
    A, B = C.truncated_svd(delta, 2)
    s = torch.linalg.svdvals(delta)
    assert (B @ A - delta).norm().item() == pytest.approx(s[2:].norm().item(), rel=1e-4)  # Eckart-Young
    A, B = C.truncated_svd(delta, 8, full_matrices=False)  # more than min(out, in): zero padding
    assert A.shape == (8, 9) and B.shape == (6, 8) and torch.allclose(B @ A, delta, atol=1e-5)
    assert not A[6:].any() and not B[:, 6:].any()
    A, B = C.truncated_svd(delta, 3, clamp=0.8)
    A0, B0 = C.truncated_svd(delta, 3)
    high = torch.quantile(torch.cat([B0.flatten(), A0.flatten()]), 0.8)
    assert torch.equal(A, A0.clamp(-high, high)) and torch.equal(B, B0.clamp(-high, high))
    assert not torch.equal(A, A0) or not torch.equal(B, B0)


# ================================================================================= against peft
def _peft_sources(path, build, configs, seed=0):
    """Source adapters made by peft (random A and B), each saved into ``path/<name>``."""
    torch.manual_seed(seed)
    names = list(configs)
    model = peft.get_peft_model(build(), peft.LoraConfig(**configs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(**configs[name]))
    model.save_pretrained(path)
    return names


def _load_both(path, build, names):
    P = peft.PeftModel.from_pretrained(build(), os.path.join(path, names[0]), adapter_name=names[0])
    D = dt.PeftModel.from_pretrained(build(), os.path.join(path, names[0]), adapter_name=names[0])
    for name in names[1:]:
        P.load_adapter(os.path.join(path, name), name)
        D.load_adapter(os.path.join(path, name), name)
    return P, D


SRC = dict(init_lora_weights=False)
LLAMA = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **SRC),
         "b": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], **SRC),
         "c": dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"], **SRC)}
GPT2 = {"a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], **SRC),
        "b": dict(r=4, lora_alpha=2, target_modules=["c_attn", "wte"], **SRC)}
CONV = {"a": dict(r=2, lora_alpha=4, target_modules=["conv", "conv2"], **SRC),
        "b": dict(r=2, lora_alpha=2, target_modules=["conv", "conv2"], **SRC)}
FAMILIES = {"llama": (tiny_llama, text_inputs, LLAMA), "gpt2": (tiny_gpt2_lm, text_inputs, GPT2),
            "conv": (tiny_convnet, conv_inputs, CONV)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Per family: (peft model, deltatune model, inputs) holding the same sources."""
    built = {}
    for family, (build, inputs, configs) in FAMILIES.items():
        path = str(tmp_path_factory.mktemp(family))
        names = _peft_sources(path, build, configs)
        built[family] = (*_load_both(path, build, names), inputs())
    return built


def _combined_outputs(model, combine, inputs):
    combine()
    model.set_adapter("combo")
    try:
        return _out(model, inputs)
    finally:
        model.set_adapter(list(model.peft_config)[0])
        model.delete_adapter("combo")


# (family, adapters, weights, combination_type, options)
PEFT_CASES = [
    ("llama", "abc", [0.7, 0.5, 1.2], "svd", {}),
    ("llama", "abc", [0.7, 0.5, 1.2], "svd", dict(svd_rank=6, svd_clamp=0.95)),
    ("llama", "abc", [0.7, -0.5, 1.2], "cat", {}),
    ("llama", "ab", [0.7, 0.5], "linear", {}),
    ("llama", "ab", [0.7, 0.5], "ties", dict(density=0.5)),
    ("llama", "ab", [0.7, 0.5], "ties", dict(density=0.5, majority_sign_method="frequency")),
    ("llama", "ab", [0.7, 0.5], "magnitude_prune", dict(density=0.6)),
    ("llama", "abc", [0.7, 0.5, -1.2], "ties_svd", dict(density=0.5)),
    ("llama", "abc", [0.7, 0.5, 1.2], "magnitude_prune_svd", dict(density=0.5, svd_rank=3)),
    # DARE at density 1 draws nothing (peft's randomness cannot be matched, see test_dare_*): the plumbing
    ("llama", "ab", [0.7, 0.5], "dare_linear", dict(density=1.0)),
    ("llama", "ab", [0.7, 0.5], "dare_ties", dict(density=1.0)),
    ("llama", "abc", [0.7, 0.5, 1.2], "dare_linear_svd", dict(density=1.0)),
    ("llama", "abc", [0.7, 0.5, 1.2], "dare_ties_svd", dict(density=1.0, majority_sign_method="frequency")),
    ("llama", "c", [-0.8], "svd", dict(svd_rank=1)),  # one source: linear (svd_rank unused), negative weight
    ("gpt2", "ab", [0.7, 0.5], "svd", {}),
    ("gpt2", "ab", [0.7, -0.5], "cat", {}),
    ("gpt2", "ab", [0.7, 0.5], "linear", {}),
    ("gpt2", "ab", [0.7, 0.5], "ties_svd", dict(density=0.4)),
    ("conv", "ab", [0.7, 0.5], "svd", {}),
    ("conv", "ab", [0.7, -0.5], "cat", {}),
    ("conv", "ab", [0.7, 0.5], "ties", dict(density=0.5)),
]


@pytest.mark.parametrize("family,adapters,weights,kind,options", PEFT_CASES,
                         ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(PEFT_CASES)])
def test_same_outputs_as_peft(pairs, family, adapters, weights, kind, options):
    P, D, inputs = pairs[family]
    args = (list(adapters), weights, "combo")
    expected = _combined_outputs(P, lambda: P.add_weighted_adapter(*args, combination_type=kind, **options), inputs)
    got = _combined_outputs(D, lambda: D.add_weighted_adapter(*args, combination_type=kind, **options), inputs)  # the public method
    with D.disable_adapter():
        base = _out(D, inputs)
    assert (expected - base).abs().max() > 1e-3  # the combination does something
    assert (got - expected).abs().max() <= ATOL


def test_combined_config_as_peft_writes_it(pairs):
    P, D, _ = pairs["llama"]
    add_weighted_adapter(D, ["a", "c"], [1.0, 1.0], "combo", combination_type="cat")
    try:
        config = D.peft_config["combo"]
        assert (config.r, config.lora_alpha, config.use_rslora) == (6, 6, False)
        assert sorted(config.target_modules) == ["o_proj", "q_proj", "v_proj"]
        assert not any(p.requires_grad for n, p in D.named_parameters() if ".combo." in n)
    finally:
        D.delete_adapter("combo")


def test_combined_adapter_covers_exactly_the_source_modules():
    """When the union of the sources' target entries would adapt more modules (layers_to_transform), the
    new config names the modules themselves."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0],
                                                         init_lora_weights=False))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "combo", combination_type="cat")
    layers = _lora_layers(model)
    assert {n for n, l in layers.items() if "combo" in l.adapters} == {
        n for n, l in layers.items() if "default" in l.adapters or "b" in l.adapters}
    assert model.peft_config["combo"].layers_to_transform is None
    assert "model.layers.0.self_attn.q_proj" in model.peft_config["combo"].target_modules


# ================================================================================= DARE
def _factors(model, name):
    return {n: (layer.adapters[name].lora_A.detach().clone(), layer.adapters[name].lora_B.detach().clone())
            for n, layer in _lora_layers(model).items() if name in layer.adapters}


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_reproducible_with_seed(pairs, kind):
    _, D, _ = pairs["gpt2"]
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        add_weighted_adapter(D, ["a", "b"], [0.7, 0.5], "combo", combination_type=kind, density=0.5)
        runs.append(_factors(D, "combo"))
        D.delete_adapter("combo")
        add_weighted_adapter(D, ["a", "b"], [0.7, 0.5], "combo", combination_type=kind, density=0.5,
                             generator=torch.Generator().manual_seed(seed))
        runs.append(_factors(D, "combo"))
        D.delete_adapter("combo")
    for i in (1, 2, 3):
        assert all(torch.equal(runs[0][n][0], runs[i][n][0]) and torch.equal(runs[0][n][1], runs[i][n][1])
                   for n in runs[0])
    assert not all(torch.equal(runs[0][n][0], runs[4][n][0]) for n in runs[0])


def test_dare_linear_svd_correct_in_expectation(pairs):
    """Full rank, so each draw is exactly sum_i w_i drop(s_i B_i A_i); the mean over draws -> sum_i w_i s_i B_i A_i."""
    _, D, _ = pairs["gpt2"]
    layers, ws, draws = _lora_layers(D), [0.7, 0.5], 100
    target = {n: sum(w * l.delta_weight(a) for a, w in zip("ab", ws)) for n, l in layers.items()}
    total = {n: torch.zeros_like(t) for n, t in target.items()}
    g = torch.Generator().manual_seed(0)
    for i in range(draws):
        add_weighted_adapter(D, ["a", "b"], ws, "combo", combination_type="dare_linear_svd", density=0.7,
                             svd_rank=32, generator=g)
        for n, l in layers.items():
            delta = l.delta_weight("combo")
            if i == 0:  # one draw is far from the undropped result
                assert (delta - target[n]).norm() / target[n].norm() > 0.3
            total[n] += delta
        D.delete_adapter("combo")
    for n, t in target.items():
        err = (total[n] / draws - t).norm() / t.norm()
        assert err < 0.15, n


def test_dare_linear_factors_correct_in_expectation(pairs):
    """dare_linear draws on the factors: the mean new A (and B) -> the undropped linear combination's."""
    _, D, _ = pairs["llama"]
    add_weighted_adapter(D, ["a", "b"], [0.7, 0.5], "lin", combination_type="linear")
    target, draws = _factors(D, "lin"), 100
    D.delete_adapter("lin")
    total = {n: [torch.zeros_like(a), torch.zeros_like(b)] for n, (a, b) in target.items()}
    g = torch.Generator().manual_seed(1)
    for _ in range(draws):
        add_weighted_adapter(D, ["a", "b"], [0.7, 0.5], "combo", combination_type="dare_linear", density=0.7,
                             generator=g)
        for n, (a, b) in _factors(D, "combo").items():
            total[n][0] += a
            total[n][1] += b
        D.delete_adapter("combo")
    for n, (a, b) in target.items():
        assert (total[n][0] / draws - a).norm() / a.norm() < 0.12
        assert (total[n][1] / draws - b).norm() / b.norm() < 0.12


# ================================================================================= save and reload
def _roundtrip(D, build, inputs, path):
    """The combined adapter saved by deltatune gives the same outputs loaded into deltatune and into peft."""
    D.set_adapter("combo")
    expected = _out(D, inputs)
    D.save_pretrained(path, selected_adapters=["combo"])
    folder = os.path.join(path, "combo")
    again = dt.PeftModel.from_pretrained(build(), folder)
    theirs = peft.PeftModel.from_pretrained(build(), folder)
    assert (_out(again, inputs) - expected).abs().max() <= ATOL
    assert (_out(theirs, inputs) - expected).abs().max() <= ATOL


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_rank_pattern_sources_save_and_reload(tmp_path, kind):
    """peft's combined adapter of rank_pattern sources does not reload; ours has one rank (zero-padded)."""
    pattern = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"layers.0.self_attn.q_proj": 2},
                   alpha_pattern={"v_proj": 3}, init_lora_weights=False)
    names = _peft_sources(str(tmp_path / "src"), tiny_llama, {"a": pattern, "b": {**pattern, "lora_alpha": 2}})
    P, D = _load_both(str(tmp_path / "src"), tiny_llama, names)
    inputs = text_inputs()
    add_weighted_adapter(D, ["a", "b"], [0.6, 0.9], "combo", combination_type=kind)
    assert D.peft_config["combo"].rank_pattern == {} and D.peft_config["combo"].r == (8 if kind == "cat" else 4)
    if kind != "svd":  # where peft gets the values right, ours are the same
        P.add_weighted_adapter(["a", "b"], [0.6, 0.9], "combo", combination_type=kind)
        P.set_adapter("combo")
        D.set_adapter("combo")
        assert (_out(P, inputs) - _out(D, inputs)).abs().max() <= ATOL
    _roundtrip(D, tiny_llama, inputs, str(tmp_path / "out"))


class Convs(nn.Module):
    """Conv1d and Conv3d, where peft's SVD types fail."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c3 = nn.Conv3d(6, 4, (2, 3, 3), padding=1)

    def forward(self, x):
        h = torch.relu(self.c1(x))  # (N, 6, 8)
        return self.c3(h.reshape(h.shape[0], 6, 2, 2, 2))


def _convs():
    torch.manual_seed(0)
    return Convs().eval()


@pytest.mark.parametrize("kind,options", [("svd", dict(svd_rank=24)), ("cat", {}), ("magnitude_prune_svd", dict(density=1.0, svd_rank=6))])
def test_conv1d_conv3d_exact_and_reload(tmp_path, kind, options):
    names = _peft_sources(str(tmp_path / "src"), _convs, {
        "a": dict(r=3, lora_alpha=6, target_modules=["c1", "c3"], **SRC),
        "b": dict(r=2, lora_alpha=2, target_modules=["c1", "c3"], use_rslora=True, **SRC)})
    _, D = _load_both(str(tmp_path / "src"), _convs, names)
    add_weighted_adapter(D, names, [0.8, -0.4], "combo", combination_type=kind, **options)
    for name, layer in _lora_layers(D).items():  # full rank: B A = sum_i w_i s_i B_i A_i
        expected = 0.8 * layer.delta_weight("a") - 0.4 * layer.delta_weight("b")
        assert torch.allclose(layer.delta_weight("combo"), expected, atol=1e-5), name
    inputs = {"x": torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))}
    _roundtrip(D, _convs, inputs, str(tmp_path / "out"))


def test_conv1d_truncated_svd_is_the_best_rank_r(tmp_path):
    names = _peft_sources(str(tmp_path), _convs, {"a": dict(r=3, target_modules=["c1"], **SRC),
                                                  "b": dict(r=3, target_modules=["c1"], **SRC)})
    _, D = _load_both(str(tmp_path), _convs, names)
    add_weighted_adapter(D, names, [1.0, 1.0], "combo", combination_type="svd", svd_rank=2)
    layer = _lora_layers(D)["c1"]
    full = (layer.delta_weight("a") + layer.delta_weight("b")).reshape(6, -1)
    s = torch.linalg.svdvals(full)
    err = (layer.delta_weight("combo").reshape(6, -1) - full).norm()
    assert err.item() == pytest.approx(s[2:].norm().item(), rel=1e-4)


# ================================================================================= where peft is wrong
@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_rslora_sources_fold_their_own_scaling(kind):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                         target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
    add_weighted_adapter(model, ["default", "b"], [0.5, 1.5], "combo", combination_type=kind, svd_rank=32)
    for name, layer in _lora_layers(model).items():
        expected = sum(w * layer.delta_weight(a) for a, w in [("default", 0.5), ("b", 1.5)] if a in layer.adapters)
        assert torch.allclose(layer.delta_weight("combo"), expected, atol=1e-5), name


# ================================================================================= refusals
def _snapshot(model):
    return (list(model.peft_config), model.active_adapters,
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            [n for n, _ in model.named_modules()])


def _assert_unchanged(model, snap):
    names, active, params, modules = snap
    assert list(model.peft_config) == names and model.active_adapters == active
    assert [n for n, _ in model.named_modules()] == modules
    now = dict(model.named_parameters())
    assert sorted(now) == sorted(params)
    for n, (value, flag) in params.items():
        assert torch.equal(now[n], value) and now[n].requires_grad == flag, n


@pytest.fixture
def two_ranks():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("dora", dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    return model


@pytest.mark.parametrize("call,message", [
    (dict(adapters=["default", "nope"]), "unknown adapter"),
    (dict(weights=[1.0]), "2 adapters"),
    (dict(adapter_name="b"), "already exists"),
    (dict(combination_type="mean"), "unknown combination_type"),
    (dict(combination_type="linear"), "one rank per layer"),
    (dict(combination_type="ties", density=0.5), "one rank per layer"),
    (dict(adapters=["default", "default"], combination_type="linear", weights=[1.0, -1.0]), "cross terms"),
    (dict(combination_type="ties_svd"), "needs a density"),
    (dict(combination_type="dare_linear_svd", density=0.0), "needs a density"),
    (dict(majority_sign_method="mean"), "majority_sign_method"),
    (dict(svd_rank=0), "svd_rank"),
    (dict(svd_clamp=1.5), "svd_clamp"),
    (dict(svd_driver="gesvdj"), "CUDA"),
    (dict(adapters=["default", "dora"]), "DoRA"),
    (dict(weights=[1.0, float("nan")]), "finite"),
])
def test_refusals_leave_model_unchanged(two_ranks, call, message):
    args = dict(adapters=["default", "b"], weights=[1.0, 1.0], adapter_name="combo", combination_type="svd")
    args.update(call)
    snap = _snapshot(two_ranks)
    with pytest.raises(ValueError, match=message):
        add_weighted_adapter(two_ranks, **args)
    _assert_unchanged(two_ranks, snap)


def test_prompt_learning_adapter_refused():
    model = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="prompt-learning"):
        add_weighted_adapter(model, ["default"], [1.0], "combo")
    _assert_unchanged(model, snap)


def test_modules_to_save_copies():
    """Several sources with a copy of one module: refused (as peft); one source: its trained copy is carried."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                         init_lora_weights=False))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("c", dt.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save"):
        add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "combo", combination_type="cat")
    _assert_unchanged(model, snap)
    add_weighted_adapter(model, ["default", "c"], [1.0, 1.0], "combo", combination_type="cat")
    head = model.base_model.model.lm_head.modules_to_save
    assert torch.equal(head["combo"].weight, head["default"].weight)


def test_failed_fill_puts_model_back(two_ranks, monkeypatch):
    import deltatune.methods.lora.weighted as W

    real = W._fill

    def failing(*args, **kwargs):
        real(*args, **kwargs)  # the new adapter is filled, then something goes wrong
        raise RuntimeError("boom")

    monkeypatch.setattr(W, "_fill", failing)
    snap = _snapshot(two_ranks)
    with pytest.raises(RuntimeError, match="boom"):
        add_weighted_adapter(two_ranks, ["default", "b"], [1.0, 1.0], "combo", combination_type="cat")
    _assert_unchanged(two_ranks, snap)
    monkeypatch.setattr(W, "_fill", real)
    add_weighted_adapter(two_ranks, ["default", "b"], [1.0, 1.0], "combo", combination_type="cat")
    assert "combo" in two_ranks.peft_config
