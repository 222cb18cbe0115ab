"""OFT and VeRA: the pure math against explicit formulas, checkpoints both ways with peft 0.21, merging,
several adapters, mixed-adapter batches, training and bad configs."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from conftest import (main_output, perturb_trainable, text_inputs, tiny_bert_cls, tiny_gpt2_cls, tiny_llama,
                      train_lm_steps)
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.methods.oft import OFTConfig
from deltatune.methods.oft import functional as OF
from deltatune.methods.vera import VeraConfig
from deltatune.methods.vera import functional as VF

LIBS = {"oft": (OFTConfig, peft.OFTConfig), "vera": (VeraConfig, peft.VeraConfig)}


def _out(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def _skew_vec(n, b, seed=0, scale=0.3):
    return torch.randn(n, b * (b - 1) // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ------------------------------------------------------------------------------------------ OFT math
def test_skew_fills_the_upper_triangle_row_major_and_is_antisymmetric():
    vec = torch.arange(1.0, 7.0).reshape(1, 6)  # b = 4: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    Q = OF.skew(vec, 4)[0]
    expected = torch.tensor([[0, 1, 2, 3], [-1, 0, 4, 5], [-2, -4, 0, 6], [-3, -5, -6, 0]], dtype=torch.float32)
    assert torch.equal(Q, expected)
    assert torch.equal(OF.unskew(Q[None]), vec)


def test_cayley_is_i_plus_s_times_inverse_of_i_minus_s_and_orthogonal():
    vec = _skew_vec(3, 5)
    S = -OF.skew(vec, 5)  # peft's R = (I - Q)(I + Q)^-1, i.e. (I + S)(I - S)^-1 with S = -Q
    eye = torch.eye(5, dtype=torch.float64)
    explicit = torch.stack([(eye + s) @ torch.linalg.inv(eye - s) for s in S])
    R = OF.cayley(vec, 5)
    torch.testing.assert_close(R, explicit, rtol=0, atol=1e-12)
    torch.testing.assert_close(R.transpose(-2, -1) @ R, eye.expand(3, 5, 5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 7])
def test_cayley_neumann_is_the_truncated_series(terms):
    vec = _skew_vec(2, 6, seed=1)
    Q = OF.skew(vec, 6)
    eye = torch.eye(6, dtype=torch.float64).expand_as(Q)
    if terms == 1:
        explicit = eye
    elif terms == 2:
        explicit = eye + 2 * Q
    else:  # I + 2(Q + ... + Q^(m-1)) + Q^m, m = max(n - 1, 3)
        m = max(terms - 1, 3)
        explicit = eye + 2 * sum(torch.linalg.matrix_power(Q, k) for k in range(1, m)) + torch.linalg.matrix_power(Q, m)
    torch.testing.assert_close(OF.cayley_neumann(vec, 6, terms), explicit, rtol=0, atol=1e-12)
    # and peft's own routine gives the same blocks
    module = peft.tuners.oft.layer.OFTRotationModule(2, vec.shape[1], 6, 12, num_cayley_neumann_terms=terms)
    ref = module._cayley_batch(vec.float(), 6, True, terms)
    torch.testing.assert_close(OF.cayley_neumann(vec.float(), 6, terms), ref, rtol=0, atol=1e-6)


def test_neumann_approximates_the_transpose_of_the_exact_transform():
    vec = _skew_vec(2, 4, seed=2, scale=0.01)  # peft's two transforms use opposite sign conventions
    torch.testing.assert_close(OF.cayley_neumann(vec, 4, 8), OF.cayley(vec, 4).transpose(-2, -1), rtol=0, atol=1e-10)


def test_coft_projection_scales_blocks_outside_the_ball_and_keeps_those_inside():
    b, eps = 4, 0.5
    big = torch.full((1, 6), 1.0, dtype=torch.float64)   # ||Q||_F = sqrt(12)
    small = torch.full((1, 6), 0.01, dtype=torch.float64)
    vec = torch.cat([big, small])
    radius = eps / 2 ** 0.5  # eps / sqrt(n_blocks)
    out = OF.coft_project(vec, b, eps)
    torch.testing.assert_close(out[0], big[0] * radius / 12 ** 0.5)
    torch.testing.assert_close(out[1], small[0])
    torch.testing.assert_close(OF.coft_project(out, b, eps), out)
    module = peft.tuners.oft.layer.OFTRotationModule(2, 6, b, 8)
    torch.testing.assert_close(out.float(), module._project_batch(vec.float(), eps=eps))


def test_block_rotation_of_inputs_and_weights_is_the_block_diagonal_product():
    R = OF.cayley(_skew_vec(3, 4, seed=3), 4)
    BD = OF.block_diagonal(R)
    assert BD.shape == (12, 12) and torch.equal(BD[4:8, 4:8], R[1]) and not BD[:4, 4:].any()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    W = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(OF.rotate_input(x, R), x @ BD)
    torch.testing.assert_close(OF.rotate_weight(W, R), W @ BD.T)
    torch.testing.assert_close(OF.rotate_input(x, R) @ W.T, x @ OF.rotate_weight(W, R).T)
    torch.testing.assert_close(OF.rotate_weight(OF.rotate_weight(W, R), OF.inverse_blocks(R)), W)


def test_block_dropout_replaces_a_fraction_of_blocks_by_the_identity():
    R = OF.cayley(_skew_vec(8, 3, seed=4), 3)
    out = OF.drop_blocks(R, 0.5, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(3, dtype=R.dtype)
    dropped = [i for i in range(8) if torch.equal(out[i], eye)]
    assert len(dropped) == 4 and all(torch.equal(out[i], R[i]) for i in range(8) if i not in dropped)
    assert torch.equal(OF.drop_blocks(R[:1], 0.9), R[:1])  # a shared block is never dropped


# ------------------------------------------------------------------------------------------ VeRA math
def test_vera_delta_is_lambda_b_B_lambda_d_A_x():
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    ld, lb = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    dW = torch.diag(lb) @ B @ torch.diag(ld) @ A
    torch.testing.assert_close(VF.delta_weight(A, B, ld, lb), dW)
    torch.testing.assert_close(VF.delta(x, A, B, ld, lb), (dW @ x.T).T)


def test_vera_projections_are_peft_draws_bit_for_bit():
    A, B = VF.projections(7, 4, 48, 40)
    g = torch.Generator().manual_seed(7)
    ref_A = peft.tuners.vera.model._kaiming_init((4, 48), generator=g)
    ref_B = peft.tuners.vera.model._kaiming_init((40, 4), generator=g)
    assert torch.equal(A, ref_A) and torch.equal(B, ref_B)
    assert A.abs().max() <= (6 / 48) ** 0.5 and B.abs().max() <= (6 / 4) ** 0.5


# ------------------------------------------------------------------------------------------ models
class ConvNet(nn.Module):
    """A 1x1 conv (where peft's unmerged OFT is the rotation), a 3x3 conv (where it is not), a linear head."""

    def __init__(self):
        super().__init__()
        self.point = nn.Conv2d(4, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(torch.relu(self.point(x)))).mean((-1, -2)))


def tiny_conv():
    torch.manual_seed(0)
    return ConvNet().eval()


def conv_inputs():
    return {"x": torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(4))}


LLAMA = ["q_proj", "v_proj", "down_proj"]
CASES = [  # (id, method, build, inputs, config kwargs)
    ("oft-block8", "oft", tiny_llama, text_inputs, dict(oft_block_size=8, target_modules=LLAMA)),
    ("oft-r4-exact", "oft", tiny_llama, text_inputs, dict(r=4, oft_block_size=0, use_cayley_neumann=False,
                                                          target_modules=LLAMA)),
    ("oft-share", "oft", tiny_llama, text_inputs, dict(oft_block_size=4, block_share=True, target_modules=LLAMA)),
    ("oft-coft", "oft", tiny_llama, text_inputs, dict(oft_block_size=8, coft=True, eps=0.05, target_modules=LLAMA,
                                                      num_cayley_neumann_terms=3)),
    ("oft-bert-cls", "oft", tiny_bert_cls, text_inputs, dict(task_type="SEQ_CLS", oft_block_size=16, bias="all",
                                                             target_modules=["query", "value", "dense"])),
    ("oft-conv1x1", "oft", tiny_conv, conv_inputs, dict(oft_block_size=2, target_modules=["point", "head"])),
    ("oft-embedding", "oft", tiny_llama, text_inputs, dict(oft_block_size=8, target_modules=["embed_tokens", "o_proj"],
                                                           use_cayley_neumann=False)),
    ("vera-llama", "vera", tiny_llama, text_inputs, dict(r=4, target_modules=LLAMA, save_projection=False)),
    ("vera-gpt2-conv1d", "vera", tiny_gpt2_cls, text_inputs, dict(r=8, target_modules=["c_attn", "c_fc"],
                                                                  save_projection=False, d_initial=0.5)),
    ("vera-bert-cls", "vera", tiny_bert_cls, text_inputs, dict(task_type="SEQ_CLS", r=6, projection_prng_key=3,
                                                               target_modules=["query", "key", "dense"],
                                                               save_projection=False)),
    ("vera-all-linear", "vera", tiny_llama, text_inputs, dict(r=16, target_modules="all-linear", vera_dropout=0.1,
                                                             save_projection=False, projection_prng_key=11)),
]


@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_checkpoints_load_in_the_other_library(case, direction, tmp_path):
    _, method, build, make_inputs, kwargs = case
    dt_cfg, peft_cfg = LIBS[method]
    (src_lib, src_cfg), (dst_lib, _) = ((peft, peft_cfg), (dt, dt_cfg)) if direction == "peft->deltatune" else \
        ((dt, dt_cfg), (peft, peft_cfg))
    inputs = make_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = src_lib.get_peft_model(build(), src_cfg(**kwargs))
    perturb_trainable(source, 0, 0.2)
    source.eval()  # (dropout off: peft's new dropout modules start in training mode)
    want = _out(source, inputs)
    assert (want - _out(build(), inputs)).abs().max() > 1e-3
    source.save_pretrained(str(tmp_path / "a"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = dst_lib.PeftModel.from_pretrained(build(), str(tmp_path / "a"))
    torch.testing.assert_close(_out(target, inputs), want, rtol=0, atol=1e-5)
    target.save_pretrained(str(tmp_path / "b"))
    # (peft also writes a targeted embedding's base weight, save_embedding_layers="auto"; deltatune does not)
    a, b = ({k: v for k, v in load_file(str(tmp_path / d / "adapter_model.safetensors")).items()
             if not k.endswith("base_layer.weight")} for d in "ab")
    assert sorted(a) == sorted(b)
    for k in a:  # (COFT re-projects its parameters in each forward, in both libraries: rounding-level changes)
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-7 if kwargs.get("coft") else 0)
    ja, jb = (json.load(open(tmp_path / d / "adapter_config.json")) for d in "ab")
    assert set(ja) ^ set(jb) <= {"peft_version"}


def test_oft_on_3x3_convolutions_equals_peft_merged_and_starts_as_the_base(tmp_path):
    kwargs = dict(oft_block_size=8, target_modules=["conv"])
    inputs = conv_inputs()
    fresh = dt.get_peft_model(tiny_conv(), OFTConfig(**kwargs))
    assert torch.equal(_out(fresh, inputs), _out(tiny_conv(), inputs))  # (peft 0.21's is not: it sums patches)
    pm = peft.get_peft_model(tiny_conv(), peft.OFTConfig(**kwargs))
    perturb_trainable(pm, 1, 0.2)
    pm.save_pretrained(str(tmp_path))
    dm = dt.PeftModel.from_pretrained(tiny_conv(), str(tmp_path))
    assert dm.base_model.model.conv.adapters["default"].oft_R.shape == (9, 28)  # 8 * 3 * 3 = 72 = 9 blocks of 8
    torch.testing.assert_close(_out(dm, inputs), _out(pm.merge_and_unload(), inputs), rtol=0, atol=1e-5)


def test_oft_adjusts_sizes_that_do_not_divide_the_layer_as_peft_does():
    kwargs = dict(oft_block_size=5, target_modules=["q_proj", "down_proj"])  # 32 -> 4, 64 -> 4
    with pytest.warns(UserWarning, match="oft_block_size=5 does not divide"):
        dm = dt.get_peft_model(tiny_llama(), OFTConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.OFTConfig(**kwargs))
        pm2 = peft.get_peft_model(tiny_llama(), peft.OFTConfig(r=5, oft_block_size=0, target_modules=["q_proj"]))
        dm2 = dt.get_peft_model(tiny_llama(), OFTConfig(r=5, oft_block_size=0, target_modules=["q_proj"]))
    shapes = lambda sd: {k: v.shape for k, v in sd.items() if "oft_R" in k}  # noqa: E731
    assert sorted(shapes(dt.get_peft_model_state_dict(dm)).values()) == \
        sorted(shapes(peft.get_peft_model_state_dict(pm)).values())
    assert list(shapes(dt.get_peft_model_state_dict(dm2)).values()) == \
        list(shapes(peft.get_peft_model_state_dict(pm2)).values())


# ------------------------------------------------------------------------------------------ merging
MERGE_CASES = [c for c in CASES if c[0] in ("oft-block8", "oft-r4-exact", "oft-coft", "oft-conv1x1", "oft-embedding",
                                             "vera-llama", "vera-gpt2-conv1d")]


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_merge_equals_unmerged_matches_peft_and_unmerge_restores(case):
    _, method, build, make_inputs, kwargs = case
    dt_cfg, peft_cfg = LIBS[method]
    inputs = make_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build(), peft_cfg(**kwargs))
    perturb_trainable(pm, 1, 0.2)
    pm.eval()
    dm = dt.get_peft_model(build(), dt_cfg(**kwargs))
    dt.set_peft_model_state_dict(dm, peft.get_peft_model_state_dict(pm))
    dm.eval()
    unmerged = _out(dm, inputs)
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    dm.merge_adapter(safe_merge=True)
    torch.testing.assert_close(_out(dm, inputs), unmerged, rtol=0, atol=1e-5)
    dm.unmerge_adapter()
    for k, v in dm.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-5, msg=k)
    torch.testing.assert_close(_out(dm, inputs), unmerged, rtol=0, atol=1e-5)
    merged_p = copy.deepcopy(pm).merge_and_unload().state_dict()
    merged_d = copy.deepcopy(dm).merge_and_unload().state_dict()
    assert sorted(merged_p) == sorted(merged_d)
    for k in merged_p:
        torch.testing.assert_close(merged_d[k], merged_p[k], rtol=0, atol=1e-5, msg=k)


def test_a_failed_safe_merge_leaves_the_weights_unchanged():
    for config in (OFTConfig(oft_block_size=8, target_modules=["q_proj"]),
                   VeraConfig(r=4, target_modules=["q_proj"], save_projection=False)):
        model = dt.get_peft_model(tiny_llama(), config)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if p.requires_grad).fill_(float("nan"))
        before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
        with pytest.raises(ValueError, match="NaN"):
            model.merge_adapter(safe_merge=True)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------------ several adapters
@pytest.mark.parametrize("method", ["oft", "vera"])
def test_two_active_adapters_match_peft_and_merge_to_the_same_outputs(method):
    dt_cfg, peft_cfg = LIBS[method]
    if method == "oft":  # rotations do not commute: the order (first active first, as peft) matters
        first, second = dict(oft_block_size=8, target_modules=LLAMA), dict(r=2, oft_block_size=0,
                                                                           target_modules=["q_proj", "up_proj"])
    else:  # peft's later VeRA adapters reuse the first one's projections: same r, key and largest sizes
        first = dict(r=4, target_modules=LLAMA, save_projection=False)
        second = dict(r=4, target_modules=["q_proj", "down_proj"], save_projection=False, d_initial=0.3)
    inputs = text_inputs()
    dm = dt.get_peft_model(tiny_llama(), dt_cfg(**first))
    dm.add_adapter("b", dt_cfg(**second))
    dm.set_adapter(["default", "b"])
    perturb_trainable(dm, 2, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft_cfg(**first))
        pm.add_adapter("b", peft_cfg(**second))
    for name in ("default", "b"):
        peft.set_peft_model_state_dict(pm, dt.get_peft_model_state_dict(dm, adapter_name=name), adapter_name=name)
    pm.base_model.set_adapter(["default", "b"])
    both = _out(dm, inputs)
    torch.testing.assert_close(both, _out(pm.eval(), inputs), rtol=0, atol=1e-5)
    dm.set_adapter("b")
    only_b = _out(dm, inputs)
    dm.set_adapter(["default", "b"])
    assert (both - only_b).abs().max() > 1e-3
    dm.merge_adapter()
    torch.testing.assert_close(_out(dm, inputs), both, rtol=0, atol=1e-5)
    dm.unmerge_adapter()
    dm.delete_adapter("default")
    torch.testing.assert_close(_out(dm, inputs), only_b, rtol=0, atol=1e-5)


def test_vera_adapters_of_one_model_must_share_the_prng_key_and_the_model_is_unchanged():
    model = dt.get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=LLAMA, save_projection=False))
    layers_before = dict(model.named_modules())
    with pytest.raises(ValueError, match="share projection_prng_key"):
        model.add_adapter("b", VeraConfig(r=4, target_modules=["q_proj"], projection_prng_key=1,
                                          save_projection=False))
    assert dict(model.named_modules()).keys() == layers_before.keys() and list(model.peft_config) == ["default"]


def test_vera_projections_are_shared_sized_from_all_targets_and_drawn_once():
    model = dt.get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=LLAMA, save_projection=False))
    layers = [m for n, m in model.named_modules() if n.endswith(tuple(LLAMA))]
    shared = {id(m.adapters["default"].projections) for m in layers}
    assert len(layers) == 6 and len(shared) == 1
    proj = layers[0].adapters["default"].projections
    assert not proj.drawn
    _out(model, text_inputs())
    # largest in: down_proj's 64; largest out: q_proj's and down_proj's 32 (v_proj: 16)
    assert proj.vera_A.shape == (4, 64) and proj.vera_B.shape == (32, 4)
    # the same config object on a second model gets projections of its own
    config = VeraConfig(r=4, target_modules=["q_proj"], save_projection=False)
    m1, m2 = dt.get_peft_model(tiny_llama(), config), dt.get_peft_model(tiny_llama(), config)
    p1, p2 = (m.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].projections for m in (m1, m2))
    assert p1 is not p2 and len(p1.sizes) == len(p2.sizes) == 2


# ------------------------------------------------------------------------------------------ mixed batches
def test_vera_mixed_adapter_batches_equal_each_row_alone():
    model = dt.get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=LLAMA, save_projection=False), "a")
    model.add_adapter("b", VeraConfig(r=8, target_modules=["q_proj", "up_proj"], save_projection=False))
    for name in ("a", "b"):
        model.set_adapter(name)
        perturb_trainable(model, 3 if name == "a" else 4, 0.3)
    model.eval()
    ids = text_inputs(batch=4)["input_ids"]
    names = ["a", "__base__", "b", "a"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        rows = []
        for i, n in enumerate(names):
            if n == "__base__":
                with model.disable_adapter():
                    rows.append(model(input_ids=ids[i:i + 1]).logits)
            else:
                model.set_adapter(n)
                rows.append(model(input_ids=ids[i:i + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(rows), rtol=0, atol=1e-5)
    assert (rows[0] - rows[1]).abs().max() > 1e-3 and (rows[2] - rows[1]).abs().max() > 1e-3


def test_oft_mixed_adapter_batches_are_refused_with_nothing_changed():
    model = dt.get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, target_modules=LLAMA))
    perturb_trainable(model, 5, 0.2)
    inputs = text_inputs()
    want = _out(model, inputs)
    with pytest.raises(ValueError, match=r"'default' \(OFT\) cannot run in a mixed-adapter batch"):
        model(**inputs, adapter_names=["default", "__base__"])
    torch.testing.assert_close(_out(model, inputs), want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("method", ["oft", "vera"])
def test_training_changes_only_the_adapter_tensors(method):
    config = OFTConfig(oft_block_size=8, target_modules=LLAMA) if method == "oft" else \
        VeraConfig(r=8, target_modules=LLAMA, save_projection=False)
    model = dt.get_peft_model(tiny_llama(), config)
    roles = {"oft": {"oft_R"}, "vera": {"vera_lambda_b", "vera_lambda_d"}}[method]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trainable} == roles
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses, grads = train_lm_steps(model, 6, lr=0.02)
    assert grads == trainable and losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_oft_module_dropout_acts_in_training_only():
    model = dt.get_peft_model(tiny_llama(), OFTConfig(oft_block_size=4, module_dropout=0.5, target_modules=LLAMA))
    perturb_trainable(model, 6, 0.3)
    inputs = text_inputs()
    model.eval()
    a, b = _out(model, inputs), _out(model, inputs)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = _out(model, inputs)
    assert (c - a).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ configs
def test_bad_configs_and_modules_are_refused_by_name():
    with pytest.raises(dt.ConfigError, match="exactly one of r"):
        OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(dt.ConfigError, match="exactly one of r"):
        OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(dt.ConfigError, match=r"bias must be one of \('none', 'all', 'oft_only'\), got 'lora_only'"):
        OFTConfig(bias="lora_only")
    with pytest.raises(dt.ConfigError, match=r"bias must be one of \('none', 'all', 'vera_only'\), got 'oft_only'"):
        VeraConfig(bias="oft_only")
    with pytest.raises(dt.ConfigError, match="r must be"):
        VeraConfig(r=0)
    with pytest.raises(dt.ConfigError, match="written by peft < 0.14"):
        dt.PeftConfig.from_dict({"peft_type": "OFT", "r": 8, "target_modules": ["q"]})
    with pytest.raises(TypeError, match="cannot adapt module 'transformer.h.0.attn.c_attn'.*OFT"):
        dt.get_peft_model(tiny_gpt2_cls(), OFTConfig(target_modules=["c_attn"], oft_block_size=8))
    with pytest.raises(TypeError, match="dilation"):
        dt.get_peft_model(nn.Sequential(nn.Conv2d(2, 2, 3, dilation=2)), OFTConfig(target_modules=["0"]))
    with pytest.raises(TypeError, match="cannot adapt module '0'.*VeRA"):
        dt.get_peft_model(nn.Sequential(nn.Embedding(4, 4)), VeraConfig(target_modules=["0"], save_projection=False))
    config = OFTConfig(oft_block_size=8, target_modules=["q_proj"], coft=True)
    original = config.to_dict()
    dt.get_peft_model(tiny_llama(), config)
    assert config.to_dict() == original  # configs are not mutated


def test_layer_status_reports_the_adapters():
    oft = dt.get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    vera = dt.get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=["v_proj"], save_projection=False), "v")
    vera.merge_adapter()
    q = {s.name: s for s in oft.get_layer_status()}["model.model.layers.0.self_attn.q_proj"]
    v = {s.name: s for s in vera.get_layer_status()}["model.model.layers.1.self_attn.v_proj"]
    assert (q.module_type, q.available_adapters, q.requires_grad) == ("OFTLayer", ["default"], {"default": True})
    assert (v.module_type, v.merged_adapters, v.active_adapters) == ("VeraLayer", ["v"], ["v"])


@pytest.mark.parametrize("method", ["oft", "vera"])
def test_low_cpu_mem_usage_loads_by_assignment(method, tmp_path):
    config = OFTConfig(oft_block_size=8, target_modules=LLAMA + ["embed_tokens"]) if method == "oft" else \
        VeraConfig(r=4, target_modules=LLAMA, save_projection=False)
    source = dt.get_peft_model(tiny_llama(), config)
    perturb_trainable(source, 7, 0.2)
    source.save_pretrained(str(tmp_path))
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(_out(loaded, text_inputs()), _out(source, text_inputs()), rtol=0, atol=1e-6)
