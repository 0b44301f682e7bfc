"""trajssl.optim: parameter groups, one LARS step against its formula (also at weight decay 0), the schedule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from trajssl.optim import build_optimizer, set_lr, warmup_cosine


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def _step(model: nn.Module, opt) -> dict[str, torch.Tensor]:
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.train()
    loss = model(torch.randn(8, 6, generator=torch.Generator().manual_seed(1))).square().sum()
    opt.zero_grad()
    loss.backward()
    grads = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
    opt.step()
    return before, grads


def test_groups_no_decay_for_biases_and_norms():
    opt = build_optimizer({"encoder": _model()}, "sgd", lr=0.1, weight_decay=1e-4)
    by_decay = {g["weight_decay"]: {p.ndim for p in g["params"]} for g in opt.param_groups}
    assert by_decay == {1e-4: {2}, 0.0: {1}}


@pytest.mark.parametrize("weight_decay", [1e-4, 0.0])
def test_lars_first_step_matches_its_formula(weight_decay):
    lr, eta = 0.5, 0.02
    model = _model()
    opt = build_optimizer({"encoder": model}, "lars", lr=lr, weight_decay=weight_decay, trust_coeff=eta)
    before, grads = _step(model, opt)
    for name, p in model.named_parameters():
        w, g = before[name], grads[name]
        if w.ndim > 1:  # weights: trust ratio eta |w| / (|g| + wd |w|), clipped at lr (LARC), at any weight decay
            ratio = min(eta * w.norm() / (g.norm() + weight_decay * w.norm() + 1e-8) / lr, 1.0)
            expected = w - lr * ratio * (g + weight_decay * w)
        else:  # biases, batch-norm: plain momentum SGD, no decay (the first momentum buffer is the gradient)
            expected = w - lr * g
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
    # the weights moved by a small fraction of their norm, not by lr x gradient
    w = model[0].weight.detach()
    assert (w - before["0.weight"]).norm() / before["0.weight"].norm() <= eta * (1 + 1e-4)


@pytest.mark.parametrize("name", ["lars", "sgd"])
def test_the_second_step_carries_the_momentum(name):
    """Step 2 moves by lr x (momentum x buffer + this step's (trust-scaled, decayed) gradient): the first step alone
    cannot tell momentum 0.9 from none."""
    lr, eta, wd, m = 0.5, 0.02, 1e-3, 0.9
    model = _model()
    opt = build_optimizer({"encoder": model}, name, lr=lr, weight_decay=wd, trust_coeff=eta)
    buffers = {}
    for _ in range(2):
        before, grads = _step(model, opt)
        for key, p in model.named_parameters():
            w, g = before[key], grads[key]
            decay = wd if w.ndim > 1 else 0.0
            update = g + decay * w
            if name == "lars" and w.ndim > 1:
                update = update * min(eta * w.norm() / (g.norm() + wd * w.norm() + 1e-8) / lr, 1.0)
            buffers[key] = update if key not in buffers else m * buffers[key] + update
            torch.testing.assert_close(p.detach(), w - lr * buffers[key], rtol=1e-5, atol=1e-7, msg=key)


def test_adamw_decays_the_weights_only():
    """AdamW's first step: w (1 - lr wd) - lr g / (|g| + eps) on the weights, no decay on biases and norms."""
    lr, wd = 0.01, 0.1
    model = _model()
    opt = build_optimizer({"encoder": model}, "adamw", lr=lr, weight_decay=wd)
    before, grads = _step(model, opt)
    for key, p in model.named_parameters():
        w, g = before[key], grads[key]
        decay = wd if w.ndim > 1 else 0.0
        torch.testing.assert_close(p.detach(), w * (1 - lr * decay) - lr * g / (g.abs() + 1e-8), rtol=1e-5,
                                   atol=1e-7, msg=key)


def test_schedule_warmup_cosine_and_fixed_lr_groups():
    assert warmup_cosine(0, 100, 10) == 0.0
    assert warmup_cosine(5, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(0, 100, 10, start=0.2) == pytest.approx(0.2)  # the warm-up from a given start
    assert warmup_cosine(5, 100, 10, start=0.2) == pytest.approx(0.6)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)  # half way through the cosine
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(150, 100, 10, final=0.1) == pytest.approx(0.1)
    assert warmup_cosine(40, 100, 10, final=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3)))
    opt = build_optimizer({"encoder": nn.Linear(3, 3), "predictor": nn.Linear(3, 3)}, "sgd", lr=0.2,
                          weight_decay=0.0, fixed_lr=("predictor",))
    set_lr(opt, 0.25)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.05, 0.05, 0.2, 0.2])
