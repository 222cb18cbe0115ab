"""DoRA: the norm without the dense matrix, agreement with peft (outputs, gradients, merges), caching."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import perturb_trainable, main_output, text_inputs, tiny_gpt2_cls, tiny_llama
from deltatune.methods.lora import functional as LF



@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_row_norm_equals_the_dense_formula(fan_in_fan_out):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 32, generator=g)  # (out, in)
    A, B = torch.randn(6, 32, generator=g), torch.randn(48, 6, generator=g)
    s = 1.7
    dense = (W + s * B @ A).norm(dim=1)
    stored = W.t().contiguous() if fan_in_fan_out else W
    torch.testing.assert_close(LF.dora_row_norm(stored, A, B, s, fan_in_fan_out), dense, rtol=1e-5, atol=1e-5)


MODELS = [
    (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    (tiny_gpt2_cls, dict(task_type="SEQ_CLS", r=4, target_modules=["c_attn", "c_fc"])),
]


@pytest.mark.parametrize("batch", [2, 10], ids=["14-tokens", "70-tokens"])  # 70 >= in, out: the folded paths
@pytest.mark.parametrize("build,kwargs", MODELS, ids=["llama", "gpt2-conv1d"])
def test_forward_gradients_and_merge_match_peft(build, kwargs, batch):
    inputs = text_inputs(batch=batch)
    pm = peft.get_peft_model(build(), peft.LoraConfig(use_dora=True, init_lora_weights=False, **kwargs))
    perturb_trainable(pm, scale=0.1)
    dm = dt.get_peft_model(build(), dt.LoraConfig(use_dora=True, **kwargs))
    dt.set_peft_model_state_dict(dm, peft.get_peft_model_state_dict(pm))
    pm.eval(), dm.eval()  # eval: the base models' own dropout off; gradients still flow
    out_p, out_d = main_output(pm(**inputs)), main_output(dm(**inputs))
    torch.testing.assert_close(out_d, out_p, rtol=0, atol=1e-5)
    with torch.no_grad():  # the no-grad path (cached factors, or the fold for many tokens)
        torch.testing.assert_close(main_output(dm(**inputs)), out_p.detach(), rtol=0, atol=1e-5)
    out_p.pow(2).mean().backward()
    out_d.pow(2).mean().backward()
    peft_grads = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if "lora_" in n}
    checked = 0
    for name, p in dm.named_parameters():
        if ".adapters.default." not in name:
            continue
        module, role = name.split(".adapters.default.")
        key = f"{module}.{role}.weight"
        torch.testing.assert_close(p.grad, peft_grads[key], rtol=0, atol=1e-4, msg=key)
        checked += 1
    assert checked == len(peft_grads) and any("magnitude" in k for k in peft_grads)
    merged_p = copy.deepcopy(pm).merge_and_unload().state_dict()
    merged_d = copy.deepcopy(dm).merge_and_unload().state_dict()
    for key in merged_p:
        torch.testing.assert_close(merged_d[key], merged_p[key], rtol=0, atol=1e-5, msg=key)


def test_identity_at_init_and_unmerge_restores():
    inputs = text_inputs()
    base = tiny_llama()
    want = main_output(base(**inputs)).detach()
    model = dt.get_peft_model(copy.deepcopy(base), dt.DoRAConfig(r=4, target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), want)
    perturb_trainable(model, scale=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = main_output(model(**inputs))
        model.merge_adapter()
        torch.testing.assert_close(main_output(model(**inputs)), unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-5, msg=k)


def test_norm_cache_is_reused_and_never_stale(monkeypatch):
    calls = []
    real = LF.dora_row_norm
    monkeypatch.setattr(LF, "dora_row_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = dt.get_peft_model(nn.Sequential(nn.Linear(16, 12)), dt.LoraConfig(r=4, target_modules=["0"], use_dora=True))
    layer = model.base_model.model[0]
    ad = layer.adapters["default"]
    x = torch.randn(5, 16)

    def fresh():  # the formula from scratch, no cache
        W, b = layer.base_layer.weight, layer.base_layer.bias
        dense = W + ad.scaling * ad.lora_B @ ad.lora_A
        return (ad.lora_magnitude_vector / dense.norm(dim=1)) * (x @ dense.t()) + b

    with torch.no_grad():
        ad.lora_B.add_(0.1)  # in-place change: the cached norm from creation is now stale
    calls.clear()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(), rtol=1e-5, atol=1e-5)
        for _ in range(2):
            model(x)
    assert len(calls) == 1  # computed once, then cached
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for _ in range(2):  # optimizer steps change A, B and m in place
        model(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(model(x), fresh(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a load replaces the tensors' contents
        state = {k: v * 1.5 for k, v in dt.get_peft_model_state_dict(model).items()}
        dt.set_peft_model_state_dict(model, state)
        torch.testing.assert_close(model(x), fresh(), rtol=1e-5, atol=1e-5)
        layer.base_layer.weight.mul_(0.5)  # a changed base (e.g. another adapter merged)
        torch.testing.assert_close(model(x), fresh(), rtol=1e-5, atol=1e-5)


def test_dropout_training_and_trainable_set():
    model = dt.get_peft_model(tiny_llama(), dt.DoRAConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    model.train()
    inputs = text_inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum("lora_magnitude_vector" in n for n in grads) == 4


def test_dora_config_alias():
    assert dt.DoRAConfig(target_modules=["q"]).to_dict() == dt.LoraConfig(target_modules=["q"], use_dora=True).to_dict()


class _EmbConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv1d(6, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2))  # (N, 8, L)
        return self.conv2(h[..., None]).squeeze(-1)


def test_embedding_and_conv_dora_match_peft():
    def build():
        torch.manual_seed(0)
        return _EmbConv()

    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(r=3, lora_alpha=6, target_modules=["emb", "conv", "conv2"], use_dora=True)
    pm = peft.get_peft_model(build(), peft.LoraConfig(init_lora_weights=False, **kwargs))
    perturb_trainable(pm, scale=0.2)
    dm = dt.get_peft_model(build(), dt.LoraConfig(**kwargs))
    dt.set_peft_model_state_dict(dm, peft.get_peft_model_state_dict(pm))
    out_p, out_d = pm(ids), dm(ids)
    torch.testing.assert_close(out_d, out_p, rtol=0, atol=1e-5)
    out_p.pow(2).mean().backward()
    out_d.pow(2).mean().backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if p.grad is not None}
    names = {"lora_A": ["lora_A.weight", "lora_embedding_A"], "lora_B": ["lora_B.weight", "lora_embedding_B"],
             "lora_magnitude_vector": ["lora_magnitude_vector.weight"]}
    for name, p in dm.named_parameters():
        if p.grad is None:
            continue
        module, role = name.split(".adapters.default.")
        key = next(f"{module}.{k}" for k in names[role] if f"{module}.{k}" in theirs)
        torch.testing.assert_close(p.grad, theirs[key], rtol=0, atol=1e-4, msg=key)
        assert p.grad.abs().max() > 1e-3, key  # a real gradient, not a trivially small one
    with torch.no_grad():
        merged_p, merged_d = copy.deepcopy(pm).merge_and_unload(), copy.deepcopy(dm).merge_and_unload()
        torch.testing.assert_close(merged_d(ids), merged_p(ids), rtol=0, atol=1e-5)
        for key, value in merged_p.state_dict().items():
            torch.testing.assert_close(merged_d.state_dict()[key], value, rtol=0, atol=1e-5, msg=key)
        before = {k: v.clone() for k, v in dm.state_dict().items()}
        dm.merge_adapter()
        torch.testing.assert_close(dm(ids), out_d, rtol=1e-5, atol=1e-5)
        dm.unmerge_adapter()
        for k, v in dm.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_combine_gradients_equal_the_plain_formula(bias):
    """Output and gradients (x, A, B, m, trainable bias) against y = b + m/||W + sBA|| (W x + s B A x)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12, bias=bias))
    with torch.no_grad():
        if bias:
            base[0].bias.normal_()
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True,
                                                  init_lora_weights=False, bias="lora_only" if bias else "none"))
    perturb_trainable(model, scale=0.3)
    layer = model.base_model.model[0]
    ad = layer.adapters["default"]
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = model(x)
    g = torch.randn_like(out)
    params = [x, ad.lora_A, ad.lora_B, ad.lora_magnitude_vector] + ([layer.base_layer.bias] if bias else [])
    grads = torch.autograd.grad(out, params, g)

    ref = [p.detach().clone().requires_grad_() for p in params]
    xr, A, B, m = ref[:4]
    W = layer.base_layer.weight.detach()
    dense = W + ad.scaling * B @ A
    scale = m / dense.norm(dim=1).detach()
    want = scale * (xr @ W.t() + ad.scaling * (xr @ A.t()) @ B.t()) + (ref[4] if bias else 0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads, torch.autograd.grad(want, ref, g)):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_two_active_dora_adapters_match_peft():
    inputs = text_inputs()
    first = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    second = dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"], use_dora=True)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **first))
    pm.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **second))
    pm.base_model.set_adapter(["default", "b"])
    perturb_trainable(pm, scale=0.1)
    dm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**first))
    dm.add_adapter("b", dt.LoraConfig(**second))
    for name in ("default", "b"):
        dt.set_peft_model_state_dict(dm, peft.get_peft_model_state_dict(pm, adapter_name=name), adapter_name=name)
    dm.set_adapter(["default", "b"])
    with torch.no_grad():
        torch.testing.assert_close(main_output(dm(**inputs)), main_output(pm(**inputs)), rtol=0, atol=1e-5)
    torch.testing.assert_close(main_output(dm(**inputs)), main_output(pm(**inputs)), rtol=0, atol=1e-5)


class _DoraThenLora(nn.Module):
    """Reference for one layer with a DoRA adapter (1) and a plain LoRA adapter (2), both active:
    ``y = m / ||W + s1 B1 A1|| * (W x + s1 B1 A1 x) + s2 B2 A2 x``, the row norm detached (as in the paper)."""

    def __init__(self, weight, dora, lora):
        super().__init__()
        self.weight = weight.detach().clone()
        copy_of = lambda t: nn.Parameter(t.detach().clone())  # noqa: E731
        self.A1, self.B1, self.m = copy_of(dora.lora_A), copy_of(dora.lora_B), copy_of(dora.lora_magnitude_vector)
        self.A2, self.B2 = copy_of(lora.lora_A), copy_of(lora.lora_B)
        self.s1, self.s2 = dora.scaling, lora.scaling

    def forward(self, x):
        W = self.weight
        norm = (W + self.s1 * self.B1 @ self.A1).norm(dim=1).detach()
        dora = self.m / norm * (x @ W.t() + self.s1 * (x @ self.A1.t()) @ self.B1.t())
        return dora + self.s2 * (x @ self.A2.t()) @ self.B2.t()


def test_dora_then_lora_on_one_layer_trains():
    """A DoRA adapter followed by a plain LoRA adapter on the same layers (both active): the loss and every
    adapter gradient equal those of a plain reference implementation of the formula."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                          init_lora_weights=False))
    model.add_adapter("plain", dt.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False))
    model.set_adapter(["default", "plain"])
    perturb_trainable(model, 1, 0.3)  # m away from ||W + s B A||: the DoRA scale is not 1
    model.train()
    inputs = text_inputs()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()

    reference = tiny_llama().train()
    pairs = []
    for ours, theirs in zip(model.base_model.model.model.layers, reference.model.layers):
        layer = ours.self_attn.q_proj
        dora, lora = layer.adapters["default"], layer.adapters["plain"]
        theirs.self_attn.q_proj = ref = _DoraThenLora(layer.base_layer.weight, dora, lora)
        pairs += [(dora.lora_A, ref.A1), (dora.lora_B, ref.B1), (dora.lora_magnitude_vector, ref.m),
                  (lora.lora_A, ref.A2), (lora.lora_B, ref.B2)]
    want = reference(**inputs, labels=inputs["input_ids"]).loss
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert len(pairs) == 10 and {id(p) for p, _ in pairs} == {id(p) for p in model.parameters() if p.requires_grad}
    for got, exp in pairs:
        assert exp.grad.abs().max() > 0
        torch.testing.assert_close(got.grad, exp.grad, rtol=1e-4, atol=1e-6)
