"""The no-grad path of LoRA/DoRA on nn.Linear (cached, transposed factors) against the plain formula,
and the training path's autograd graph (no output-sized copies)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt


def _model(bias=True, seed=0, **config):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(24, 20, bias=bias), nn.Tanh(), nn.Linear(20, 12, bias=bias))
    config = {"r": 4, "lora_alpha": 12, "target_modules": ["0", "2"], "init_lora_weights": False, **config}
    model = dt.get_peft_model(base, dt.LoraConfig(**config))
    with torch.no_grad():  # magnitudes away from their start, so DoRA's scale is not 1
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    return model


def _reference(model, x):
    """The formula with plain tensors: for each layer, adapters in active order, LoRA adds and DoRA rescales."""
    def layer_out(layer, h):
        W, b = layer.base_layer.weight, layer.base_layer.bias
        out = h @ W.T + (0 if b is None else b)
        for name in layer.active:
            ad = layer.adapters[name]
            delta = ad.scaling * (h @ ad.lora_A.T) @ ad.lora_B.T
            if ad.lora_magnitude_vector is None:
                out = out + delta
            else:
                dense = W + ad.scaling * ad.lora_B @ ad.lora_A
                scale = ad.lora_magnitude_vector / dense.norm(dim=1).detach()  # detached, as in the paper
                bb = 0 if b is None else b
                out = bb + scale * (out - bb + delta)
        return out
    seq = model.base_model.model
    return layer_out(seq[2], torch.tanh(layer_out(seq[0], x)))


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(24,), (5, 24), (2, 3, 24), (4, 10, 24)])  # 40 tokens: folded (see _fold_pays)
def test_no_grad_path_equals_the_formula(dora, bias, shape):
    model = _model(bias, use_dora=dora).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        got = model(x)
    assert got.shape == (*shape[:-1], 12)
    torch.testing.assert_close(got, _reference(model, x).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, model(x).detach(), rtol=1e-5, atol=1e-5)  # the grad-mode path agrees


@pytest.mark.parametrize("tokens", [4, 40])  # 40: all adapters folded into one temporary weight
@pytest.mark.parametrize("order", [["default", "dora", "second"], ["dora", "default", "second"]])
def test_several_adapters_mixed_lora_and_dora_in_order(order, tokens):
    """The first adapter takes the fused / delta-first path, the others add or rescale after it (or with
    many tokens all are folded into a temporary weight in that order): values without gradients, and
    values and gradients in training mode, equal the formula."""
    model = _model(seed=1)
    model.add_adapter("dora", dt.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False,
                                            use_dora=True))
    model.add_adapter("second", dt.LoraConfig(r=3, target_modules=["0"], init_lora_weights=False))
    model.set_adapter(order)
    model.eval()
    x = torch.randn(tokens, 24)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, _reference(model, x).detach(), rtol=1e-5, atol=1e-5)

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * 2 + 3 * 2 + 2  # (default, dora, second) x (A, B) per layer, 2 magnitudes
    xg = x.clone().requires_grad_()
    got = model(xg)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [xg] + params, g)
    want = _reference(model, xg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(want, [xg] + params, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [3, 40])
def test_cached_factors_follow_every_change(tokens):
    model = _model(use_dora=True).eval()
    layer = model.base_model.model[0]
    ad = layer.adapters["default"]
    x = torch.randn(tokens, 24)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(model(x), _reference(model, x).detach(), rtol=1e-5, atol=1e-5)

    check()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).pow(2).sum().backward()
    optimizer.step()  # A, B and m change in place
    check()
    state = {k: v * 1.5 for k, v in dt.get_peft_model_state_dict(model).items()}
    dt.set_peft_model_state_dict(model, state)  # a load
    check()
    with torch.no_grad():
        layer.base_layer.weight.mul_(0.5)  # the base changes (DoRA's norm depends on it)
    check()
    with torch.no_grad():
        layer.base_layer.bias.add_(1.0)  # and its bias (DoRA does not rescale it)
    check()
    ad.lora_B = nn.Parameter(ad.lora_B.detach() * -1.0)  # a replaced tensor (same version counter)
    check()
    with torch.no_grad():
        ad.lora_magnitude_vector.add_(0.25)
    check()
    ad.scaling = ad.scaling * 2
    check()


def test_dropout_in_train_mode_still_applies_without_grad():
    model = _model(lora_dropout=0.5).train()
    x = torch.randn(64, 24)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
    assert (a - b).abs().max() > 1e-3  # different masks
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("tokens", [3, 40])
def test_half_base_with_float32_adapters_uses_cached_half_factors(dora, tokens):
    """A bfloat16 base with float32 adapters: the no-grad route runs the rank-r products in bfloat16 from
    factors cast once. Its outputs stay within 3 bfloat16 steps (at the output's magnitude) of the
    float64 formula, as the grad-mode route (float32 adapter products) does."""
    model = _model(use_dora=dora, seed=2)
    model.base_model.model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    reference = _model(use_dora=dora, seed=2).double()
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            q.copy_(p.double())
    model.eval()
    x = torch.randn(tokens, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        got = model(x)
        want = _reference(reference, x.double())
    assert got.dtype == torch.bfloat16
    assert not model.base_model.model[0].cache.is_empty()  # the cached route ran
    bound = 3 * 2.0 ** -8 * want.abs().max()
    assert (got.double() - want).abs().max() <= bound
    assert (model(x).detach().double() - want).abs().max() <= bound  # grad mode: the general route


def test_training_graph_has_no_output_sized_copies():
    """Adding into a view of the base output made autograd copy the output gradient in backward
    (CopySlices); the base and the adapter of a plain nn.Linear now run as one node on a 2-D view."""
    model = _model().train()
    out = model(torch.randn(2, 3, 24))
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    names = {type(fn).__name__ for fn in seen}
    assert "_LoraLinearBackward" in names and not any("CopySlices" in n for n in names)
    assert not {"MmBackward0", "AddmmBackward0"} & names  # no separate base or adapter matmul nodes


@pytest.mark.parametrize("dora", [False, True])
def test_compiled_no_grad_forward(dora):
    model = _model(use_dora=dora).eval()
    x = torch.randn(3, 24)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_fused_optimizer_steps_are_seen(dora):
    """Fused AdamW (the transformers Trainer's default) updates parameters without bumping their version
    counters; cached factors and DoRA norms must still follow."""
    model = _model(use_dora=dora)
    x = torch.randn(6, 24)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
    for _ in range(3):
        model.train()
        model(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.testing.assert_close(model(x), _reference(model, x), rtol=1e-5, atol=1e-5)  # grad mode (DoRA norm)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), _reference(model, x), rtol=1e-5, atol=1e-5)


def test_compiled_training_with_dropout_and_dora():
    """Under torch.compile the in-place autograd Functions (dropout, DoRA rescale) give way to the
    out-of-place forms: same values, gradients reach every adapter tensor."""
    model = _model(use_dora=True).train()
    x = torch.randn(4, 24)
    eager = model(x)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    drop = _model(lora_dropout=0.2).train()
    torch.compile(drop, backend="eager")(x).sum().backward()
    compiled(x).sum().backward()
    assert all(p.grad is not None for m in (model, drop) for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("hook", ["module", "global", "replaced_forward"])
def test_hooked_base_layers_are_still_called(hook, grad):
    """The fast paths call F.linear instead of the base module only when calling it would do nothing else:
    a hook on the base, a global module hook, or a replaced ``forward`` (as accelerate does) is honoured."""
    model = _model().train(grad)
    base = model.base_model.model[0].base_layer
    calls = []
    if hook == "module":
        handle = base.register_forward_hook(lambda mod, args, out: calls.append(mod))
    elif hook == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, args, out: calls.append(mod) if mod is base else None)
    else:
        plain = base.forward
        base.forward = lambda x: (calls.append(base), plain(x))[1]
    try:
        x = torch.randn(5, 24)
        with torch.set_grad_enabled(grad):
            got = model(x)
    finally:
        if hook == "replaced_forward":
            del base.forward
        else:
            handle.remove()
    assert calls == [base]
    torch.testing.assert_close(got, _reference(model, x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_a_replaced_base_weight_at_a_reused_address_is_seen(grad):
    """Caches hold the tensors they were built from, so a replacement allocated at a freed weight's address
    (same version counter, 0) cannot pass for it."""
    model = _model(use_dora=True).train(grad)
    layer = model.base_model.model[0]
    x = torch.randn(5, 24)
    with torch.set_grad_enabled(grad):
        model(x)  # builds the caches
    shape = layer.base_layer.weight.shape
    for _ in range(3):  # free the current weight, then allocate its replacement (glibc reuses the block)
        layer.base_layer.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        new = torch.empty(shape).normal_(0, 0.5)  # version 1, as the freed one had after its init
        layer.base_layer.weight = nn.Parameter(new, requires_grad=False)
        with torch.set_grad_enabled(grad):
            got = model(x)
        torch.testing.assert_close(got, _reference(model, x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_new_data_from_conversions_and_dot_data_is_seen(dora, grad):
    """``model.double()`` and ``p.data = ...`` give tensors new data with identity and version unchanged."""
    model = _model(use_dora=dora).train(grad)
    layer = model.base_model.model[0]
    ad = layer.adapters["default"]
    x = torch.randn(5, 24)

    def check():
        with torch.set_grad_enabled(grad):
            got = model(x)
        torch.testing.assert_close(got, _reference(model, x).detach(), rtol=1e-6, atol=1e-6)

    check()  # builds the caches
    model.double()
    assert layer.cache.is_empty()  # not kept alive with the old float32 data
    x = x.double()
    check()
    base = layer.base_layer
    for param, change in [(ad.lora_A, 2.0), (ad.lora_B, -1.0), (base.weight, 0.5), (base.bias, 3.0),
                          (ad.lora_magnitude_vector, 1.5)]:
        if param is not None:
            param.data = param.data * change
            check()


@pytest.mark.parametrize("dora", [False, True])
def test_copies_and_pickles_leave_the_caches_out(dora, tmp_path):
    """A deep copy would otherwise hold the cached view of the base weight as a full copy of it."""
    import copy

    model = _model(use_dora=dora).eval()
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = model(x)  # builds the caches
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)  # our own file, written just above
    for other in (twin, loaded):
        assert other.base_model.model[0].cache.is_empty()
        with torch.no_grad():
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
    assert not model.base_model.model[0].cache.is_empty()  # the original keeps its own


@pytest.mark.parametrize("dora", [False, True])
def test_a_model_made_in_inference_mode_runs_and_follows_in_place_changes(dora):
    """Inference tensors have no version counter, so nothing derived from them is cached."""
    with torch.inference_mode():
        model = _model(use_dora=dora).eval()
        x = torch.randn(5, 24)
        torch.testing.assert_close(model(x), _reference(model, x), rtol=1e-5, atol=1e-5)
        model.base_model.model[0].adapters["default"].lora_B.mul_(-2.0)  # in place, unseen by any version
        torch.testing.assert_close(model(x), _reference(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_caches_built_in_inference_mode_serve_training_afterwards(dora):
    """Evaluation under torch.inference_mode between two training steps (caches rebuilt there) must not
    leave tensors behind that autograd cannot keep."""
    model = _model(use_dora=dora)
    fresh = _model(use_dora=dora)
    x = torch.randn(5, 24)
    for m in (model, fresh):
        with torch.no_grad():
            m.base_model.model[0].adapters["default"].lora_B.mul_(1.5)  # as an optimizer step would
    model.eval()
    with torch.inference_mode():
        model(x)
    for m in (model, fresh):
        m.train()
        m(x).pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("dora", [False, True])
def test_a_second_step_on_the_same_gradients_is_seen(dora):
    """An optimizer may step again on gradients already accumulated (no backward in between, so no
    gradient hook fires): nothing is cached while a trainable tensor holds a gradient."""
    model = _model(use_dora=dora)
    x = torch.randn(6, 24)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
    model(x).pow(2).sum().backward()
    for _ in range(2):
        optimizer.step()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), _reference(model, x), rtol=1e-5, atol=1e-5)
        model.train()


def test_steps_of_another_model_leave_the_cache_alone():
    """Only gradients reaching this layer's own tensors invalidate its cache (no process-wide counter):
    training another model does not rebuild a served model's factors."""
    served, other = _model(seed=0).eval(), _model(seed=1)
    x = torch.randn(3, 24)
    with torch.no_grad():
        served(x)
    layer = served.base_model.model[0]
    entry = next(iter(layer.cache.entries.values()))
    optimizer = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=0.05, fused=True)
    for _ in range(3):
        other(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        served(x)
    assert next(iter(layer.cache.entries.values())) is entry
    served(x).pow(2).sum().backward()  # a gradient into the served model's own adapter does
    assert layer.cache.is_empty()


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_training_under_autocast_takes_the_fused_node_in_bfloat16(dora, p):
    """Under ``torch.autocast`` (bfloat16) a bfloat16 base with float32 adapters trains through the fused
    node in bfloat16, as the base runs: values and gradients equal the formula evaluated under autocast
    (bfloat16 products, the same dropout mask), and the adapters' gradients stay float32."""
    model = _model(use_dora=dora, lora_dropout=p, seed=3)
    model.base_model.model.to(torch.bfloat16)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    model.train()
    x = torch.randn(16, 24, dtype=torch.bfloat16)
    params = [q for q in model.parameters() if q.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(7)
        got = model(x)
        layer = model.base_model.model[0]
        names = set()
        stack = [got.grad_fn]
        while stack:  # the first layer's node is the fused one
            fn = stack.pop()
            if fn is not None and type(fn).__name__ not in names:
                names.add(type(fn).__name__)
                stack.extend(f for f, _ in fn.next_functions)
        assert "_LoraLinearBackward" in names
        g = torch.randn_like(got)
        grads = torch.autograd.grad(got, params, g)
        # the reference: the same formula with the same mask, autocast casting each product to bfloat16
        torch.manual_seed(7)
        want = _reference_dropout(model, x, p)
        want_grads = torch.autograd.grad(want, params, g)
    assert got.dtype == torch.bfloat16 and all(q.dtype == torch.float32 for q in grads)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, want_grads):  # normwise: bfloat16 sums over tokens cancel elementwise
        assert (a - b).norm() <= 2e-2 * b.norm(), ((a - b).norm() / b.norm()).item()
    assert layer.adapters["default"].lora_A.dtype == torch.float32


def _reference_dropout(model, x, p):
    """:func:`_reference` with the layers' dropout mask drawn as the compact sampler draws it."""
    from deltatune.methods.lora import functional as LF

    def layer_out(layer, h):
        W, b = layer.base_layer.weight, layer.base_layer.bias
        out = h @ W.T + b
        ad = layer.adapters["default"]
        h2 = h.reshape(-1, h.shape[-1])
        if p > 0:
            dropped = LF.sample_dropped(h2.numel(), p, h.device)
            keep = torch.ones(h2.numel(), dtype=h.dtype)
            keep[dropped] = 0
            h2 = h2 * keep.view_as(h2) / (1 - p)
        delta = ad.scaling * (h2 @ ad.lora_A.T) @ ad.lora_B.T
        if ad.lora_magnitude_vector is None:
            return out + delta
        dense = W.float() + ad.scaling * ad.lora_B @ ad.lora_A
        scale = ad.lora_magnitude_vector / dense.norm(dim=1).detach()
        return b + scale * (out - b + delta)
    seq = model.base_model.model
    return layer_out(seq[2], torch.tanh(layer_out(seq[0], x)))


@pytest.mark.parametrize("dora", [False, True])
def test_fullgraph_compiled_training_with_dropout(dora):
    """``torch.compile(fullgraph=True)`` while training with dropout: no data-dependent shapes (the compact
    dropout sampler is eager-only), the same gradients as eager when dropout draws nothing (p tiny)."""
    model = _model(use_dora=dora, lora_dropout=0.1).train()
    x = torch.randn(4, 24)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    compiled(x).pow(2).sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    for p in params:
        p.grad = None
    model.eval()  # no dropout: compiled training-graph values equal the eager formula
    torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=True)(x), _reference(model, x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_an_adapter_unfrozen_after_caching_is_watched(dora):
    """Caches built while the adapter was frozen (a loaded adapter, evaluated) must follow fused optimizer
    steps once the user makes it trainable again by hand."""
    model = _model(use_dora=dora)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    x = torch.randn(6, 24)
    model.eval()
    with torch.no_grad():
        model(x)  # built unwatched
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=0.05, fused=True)
    model.train()
    model(x).pow(2).sum().backward()
    if dora:  # the training forward rebuilt the norm's entry watched; the gradient dropped it
        assert not model.base_model.model[0].cache.entries
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(model, x), rtol=1e-5, atol=1e-5)


def test_training_steps_keep_the_base_row_norms():
    """A gradient into the adapter drops the adapter's entries but not ||w_i||^2 of a frozen base (it would
    be recomputed every training step); a trainable base weight's gradient drops it too."""
    model = _model(use_dora=True).train()
    layer = model.base_model.model[0]
    x = torch.randn(6, 24)
    model(x).pow(2).sum().backward()
    base_entry = layer.cache.base
    assert base_entry is not None and base_entry.sqnorm is not None and not layer.cache.entries
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    assert layer.cache.base is base_entry
    layer.base_layer.weight.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    assert layer.cache.base is None
