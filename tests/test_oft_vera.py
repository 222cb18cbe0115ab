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
    ("oft-bert-cls", "oft", tiny_bert_cls, text_inputs, dict(task_type="SEQ_CLS", oft_block_size=16,
                                                             target_modules=["query", "value", "dense"])),
    ("oft-conv1x1", "oft", tiny_conv, conv_inputs, dict(oft_block_size=2, target_modules=["point", "head"])),
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
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
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
