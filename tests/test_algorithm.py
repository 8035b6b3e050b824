"""Unit tests of the algorithm in dynat.py's block and the models in models.py.

Every test checks a property of Algorithm 1 or of a variant (SPEC.md sections 2-5) on tiny
models (wrn-10-1) and batches of 8 random 16x16 images, so the whole file runs in seconds on a
CPU. Where a value can be recomputed independently (Eq. 6, AWP's literal proxy, the ISEAT term)
the test recomputes it by hand from the adversarial batch dynat_loss attacked with (captured by
wrapping `dynat.perturb`) on fresh copies of the models.
"""
import copy
import dataclasses
import itertools
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import dynat
import dynat_runs
import models

C = 10
EPS, STEP = 8 / 255, 2 / 255
ATTACK = dict(epsilon=EPS, step_size=STEP, num_steps=2)


def make_models(classes=C, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    target = models.build_model("wrn-10-1", classes).to(dtype).train()
    guide = models.build_model("wrn-10-1", classes).to(dtype).train()
    return target, guide


def make_batch(b=8, size=16, classes=C, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g).to(dtype)
    y = torch.randint(0, classes, (b,), generator=g)
    return x, y


def weight_keys(model):
    return {n for n, p in model.named_parameters() if p.ndim > 1}


def config(**kw):
    """A dynat.Config from the test's keywords; awp_gamma > 0 switches AWP on."""
    kw = {**ATTACK, **kw}
    return dynat.Config(**kw, awp=kw.get("awp_gamma", 0) > 0) if "awp" not in kw else dynat.Config(**kw)


def call_loss(target, guide, x, y, seed=7, **kw):
    """dynat_loss on deep copies with a fixed attack seed; returns (loss, stats, target, guide)."""
    target, guide = copy.deepcopy(target), copy.deepcopy(guide)
    torch.manual_seed(seed)  # the attack's random start
    loss, stats = dynat.training_loss(target, guide, x, y, config(**kw))
    return loss, stats, target, guide


def grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


@pytest.fixture
def spy(monkeypatch):
    """Record what dynat_loss passed to and got from the attack."""
    calls = {}
    real_perturb = dynat.perturb

    def perturb(model, x, y, **kw):
        x_adv, kappa = real_perturb(model, x, y, **kw)
        calls.update(x_adv=x_adv, kappa=kappa, y_attack=y.clone(), attack=kw)
        return x_adv, kappa

    monkeypatch.setattr(dynat, "perturb", perturb)
    return calls


# ----------------------------------------------------------------------------- 1. dynamic labels (Eq. 3)

class FixedGuide(nn.Module):
    """A guide whose logits are given (a parameter, so that L_g has a gradient)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x):
        return self.logits


def test_dynamic_labels_are_the_guides_argmax_lowest_index_on_ties_without_gradient(spy):
    """Eq. 3 as dynat_loss takes it: the attack and the target's CE use argmax f_g(x), int64, no graph."""
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, -1.0, 5.0, 5.0], [-3.0, -2.0, -1.0, -1.5]])
    torch.manual_seed(0)
    target = models.build_model("wrn-10-1", 4).train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([1, 1, 3, 2])
    loss, stats = dynat.training_loss(target, FixedGuide(z), x, y, config(inner=True))
    y_dyn = spy["y_attack"]
    assert y_dyn.tolist() == [1, 0, 2, 2] and y_dyn.dtype == torch.int64 and y_dyn.grad_fn is None
    assert stats["dyn_correct"].item() == 2  # rows 0 and 3 agree with y
    loss.backward()  # L_g's gradient reaches the guide; none flows through the argmax into the target's labels


def test_dynamic_label_cross_entropy_is_onehot_cross_entropy():
    torch.manual_seed(0)
    z_guide, z_target = torch.randn(16, C), torch.randn(16, C, requires_grad=True)
    y_dyn = z_guide.argmax(1)
    onehot = F.one_hot(y_dyn, C).float()
    ce = F.cross_entropy(z_target, y_dyn)
    ref = -(onehot * F.log_softmax(z_target, 1)).sum(1).mean()
    torch.testing.assert_close(ce, ref)
    g1, = torch.autograd.grad(ce, z_target)
    g2, = torch.autograd.grad(ref, z_target)
    torch.testing.assert_close(g1, g2)


# ----------------------------------------------------------------------------- 2. dynat_loss: every variant

def variants():
    """The full product labels x inner x alpha x awp_gamma x reweight x iseat, plus label smoothing
    and beta on a few of them."""
    for labels, inner, alpha, awp_gamma, reweight, iseat in itertools.product(
            ["dynamic", "true", "lbgat"], [False, True], [0.0, 1.0], [0.0, 0.005], ["none", "gairat", "mail"],
            [0.0, 0.1]):
        kw = dict(inner=inner, alpha=alpha, awp_gamma=awp_gamma, reweight=reweight, iseat=iseat)
        yield pytest.param(labels, kw, id="-".join([labels] + [f"{k}={v}" for k, v in kw.items()]))
    for labels in ("dynamic", "true", "lbgat"):
        for kw in (dict(label_smoothing=0.2), dict(label_smoothing=0.1, beta=0.2, reweight="gairat", awp_gamma=0.005)):
            yield pytest.param(labels, kw, id="-".join([labels] + [f"{k}={v}" for k, v in kw.items()]))


@pytest.mark.parametrize("labels,kw", list(variants()))
def test_dynat_loss_every_variant_finite_and_side_effect_free(labels, kw):
    target, guide = make_models()
    x, y = make_batch()
    target.bn1.weight.requires_grad_(False)  # unusual flags must survive too
    guide.fc.bias.requires_grad_(False)
    flags_t = [p.requires_grad for p in target.parameters()]
    flags_g = [p.requires_grad for p in guide.parameters()]
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    torch.manual_seed(0)
    loss, stats = dynat.training_loss(target, guide if labels != "true" else None, x, y,
                                      config(**{"num_steps": 1, **kw, "labels": labels}))  # 1 step: 150 cases stay fast
    assert loss.ndim == 0 and torch.isfinite(loss)
    expected = {"loss_target"} | ({"loss_guide", "dyn_correct"} if labels != "true" else set()) \
        | ({"loss_iseat"} if kw.get("iseat", 0) > 0 else set())
    assert set(stats) == expected
    assert all(torch.isfinite(v) and not v.requires_grad for v in stats.values())
    # no hidden side effects: modes, requires_grad flags, grads and the target's weights
    assert target.training and guide.training
    assert [p.requires_grad for p in target.parameters()] == flags_t
    assert [p.requires_grad for p in guide.parameters()] == flags_g
    assert all(p.grad is None for p in itertools.chain(target.parameters(), guide.parameters()))
    assert all(torch.equal(p, before[n]) for n, p in target.named_parameters())
    loss.backward()  # and the graph is sound
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in target.parameters() if p.requires_grad)
    assert target.bn1.weight.grad is None


def reference_loss(target, guide, x, y, x_adv, kappa, *, labels="dynamic", beta=1.0, alpha=0.0,
                   label_smoothing=0.0, reweight="none", num_steps=2, lam=-1.0, bias=-0.5, slope=10.0):
    """Eq. 4-6 written out from SPEC section 2-3, independently of dynat_loss."""
    if labels == "true":
        loss_guide, y_t, z_g = 0.0, y, None
    else:
        z_g = guide(x)
        loss_guide, y_t = F.cross_entropy(z_g, y), z_g.detach().argmax(1)
    z_adv = target(x_adv)
    if labels == "lbgat":
        per = ((z_adv - z_g) ** 2).mean(1)
    else:
        per = F.cross_entropy(z_adv, y_t, reduction="none", label_smoothing=label_smoothing)
    w = torch.ones_like(per)
    if reweight == "gairat":
        w = 0.5 * (1 + torch.tanh(lam + 5 * (1 - 2 * kappa.float() / num_steps)))
    elif reweight == "mail":
        p = F.softmax(z_adv.detach(), 1)
        p_y = p[torch.arange(len(y_t)), y_t]
        p_other = torch.where(F.one_hot(y_t, p.shape[1]).bool(), torch.zeros_like(p), p).max(1).values
        w = torch.sigmoid(slope * (p_other - p_y + bias))
    loss = loss_guide + beta * (w / w.mean() * per).mean()
    if alpha > 0:
        z_nat = target(x)
        p_nat = F.softmax(z_nat, 1)
        loss = loss + alpha * (p_nat * (F.log_softmax(z_nat, 1) - F.log_softmax(z_adv, 1))).sum(1).mean()
    return loss, y_t


@pytest.mark.parametrize("kw", [dict(), dict(inner=True), dict(alpha=1.0, beta=0.5, label_smoothing=0.1),
                                dict(labels="true", inner=True), dict(labels="true", alpha=1.0),
                                dict(labels="lbgat"), dict(labels="lbgat", inner=True, alpha=1.0),
                                dict(reweight="gairat", num_steps=3), dict(reweight="mail", inner=True),
                                dict(labels="true", reweight="gairat", inner=True)],
                         ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "base")
def test_dynat_loss_equals_eq6_by_hand(spy, kw):
    """Value and gradients of Eq. 6 match a by-hand recomputation; the attack is the one asked for
    (Eq. 7's CE on y_dyn with inner, else the KL attack) and starts from x + 0.001 N(0, I)."""
    target, guide = make_models()
    x, y = make_batch()
    labels = kw.get("labels", "dynamic")
    loss, stats, t1, g1 = call_loss(target, guide, x, y, seed=3, **kw)
    loss.backward()
    t2, g2 = copy.deepcopy(target), copy.deepcopy(guide)
    ref, y_t = reference_loss(t2, g2, x, y, spy["x_adv"], spy["kappa"], **{k: v for k, v in kw.items() if k != "inner"})
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["loss_target"] + stats.get("loss_guide", 0), ref.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(itertools.chain(t1.parameters(), g1.parameters() if labels != "true" else []),
                    itertools.chain(t2.parameters(), g2.parameters() if labels != "true" else [])):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    if labels != "true":
        assert stats["dyn_correct"].item() == (y_t == y).sum().item()
    # the attack: loss and labels
    assert spy["attack"]["loss"] == ("ce" if kw.get("inner") else "kl")
    assert torch.equal(spy["y_attack"], y_t)
    torch.manual_seed(3)
    x_adv, kappa = dynat.perturb(copy.deepcopy(target), x, y_t, loss=spy["attack"]["loss"],
                                 **{**ATTACK, "num_steps": kw.get("num_steps", 2)})
    assert torch.equal(x_adv, spy["x_adv"]) and torch.equal(kappa, spy["kappa"])


def test_dynat_loss_runs_guide_once_and_attacks_target_in_eval_mode():
    target, guide = make_models()
    x, y = make_batch()
    seen = {"guide": [], "target": []}
    guide.register_forward_pre_hook(lambda m, inp: seen["guide"].append(m.training))
    target.register_forward_pre_hook(lambda m, inp: seen["target"].append(m.training))
    for alpha, inner, clean_bn in [(0.0, True, True), (0.0, True, False), (1.0, False, True), (1.0, False, False)]:
        seen["guide"].clear(), seen["target"].clear()
        before = {n: b.clone() for n, b in target.named_buffers()}
        torch.manual_seed(0)
        dynat.training_loss(target, guide, x, y, config(inner=inner, alpha=alpha, clean_bn=clean_bn))
        assert seen["guide"] == [True]  # SPEC 2.1: one clean forward, train mode
        attack = ATTACK["num_steps"] + (0 if inner else 1)  # the KL attack also needs p(f_t(x))
        # f_t(x') then f_t(x) in train mode (the release's BN statistics); without clean_bn f_t(x) only for alpha > 0
        train_forwards = 2 if alpha > 0 or clean_bn else 1
        assert seen["target"] == [False] * attack + [True] * train_forwards
        # the eval-mode attack leaves BN statistics alone: each buffer moved by train forwards only
        assert target.bn1.num_batches_tracked.item() == before["bn1.num_batches_tracked"].item() + train_forwards


def test_dynat_loss_true_labels_needs_no_guide():
    target, _ = make_models()
    x, y = make_batch()
    torch.manual_seed(0)
    loss, stats = dynat.training_loss(target, None, x, y, config(labels="true", inner=True))
    assert torch.isfinite(loss) and "loss_guide" not in stats and "dyn_correct" not in stats


# ----------------------------------------------------------------------------- 3. the attack

class AlwaysClassZero(nn.Module):
    """Logits (10 + s, s, -s) with s = scale * mean(x) in [0, 1]: class 0 always wins, and the
    input gradient is non-zero for every attack loss."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        s = self.scale * x.flatten(1).mean(1)
        return torch.stack([10 + s, s, -s], 1)


@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
@pytest.mark.parametrize("start", ["normal", "uniform"])
def test_perturb_stays_in_ball_and_box_and_restores_model(loss, start):
    target, _ = make_models()
    x, y = make_batch()
    x[0, 0, :4] = 0.0  # pixels at the box edges
    x[1, 1, :4] = 1.0
    target.fc.bias.requires_grad_(False)
    for mode in (True, False):
        target.train(mode)
        flags = [p.requires_grad for p in target.parameters()]
        buffers = {n: b.clone() for n, b in target.named_buffers()}
        torch.manual_seed(0)
        x_adv, kappa = dynat.perturb(target, x, y, epsilon=EPS, step_size=STEP, num_steps=3, loss=loss, start=start)
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert not torch.equal(x_adv, x)
        assert not x_adv.requires_grad
        assert kappa.dtype == torch.int64 and kappa.min() >= 0 and kappa.max() <= 3
        assert target.training == mode
        assert [p.requires_grad for p in target.parameters()] == flags
        assert all(p.grad is None for p in target.parameters())
        assert all(torch.equal(b, buffers[n]) for n, b in target.named_buffers())  # eval-mode attack


@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
@pytest.mark.parametrize("start", ["normal", "uniform"])
def test_perturb_epsilon_zero_returns_x(loss, start):
    target, _ = make_models()
    x, y = make_batch()
    for k in (0, 2):
        x_adv, kappa = dynat.perturb(target, x, y, epsilon=0.0, step_size=STEP, num_steps=k, loss=loss, start=start)
        assert torch.equal(x_adv, x)
        assert kappa.shape == y.shape and (kappa <= k).all()
    _, kappa = dynat.perturb(target, x, y, epsilon=EPS, step_size=STEP, num_steps=0, loss=loss, start=start)
    assert torch.equal(kappa, torch.zeros_like(y))


@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
def test_perturb_kappa_counts_correct_iterates(loss):
    model = AlwaysClassZero()
    x, _ = make_batch()
    y = torch.tensor([0, 1, 2, 0, 1, 0, 2, 0])
    for k in (1, 4):
        _, kappa = dynat.perturb(model, x, y, epsilon=EPS, step_size=STEP, num_steps=k, loss=loss)
        assert kappa.tolist() == [k if t == 0 else 0 for t in y.tolist()]
    assert model.scale.requires_grad and model.training


@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
def test_perturb_increases_convex_loss_of_linear_model(loss):
    """For a linear model every attack loss is convex in x, so each projected signed-gradient
    step cannot decrease it (first-order bound): the attack must increase every example's loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = 0.25 + 0.5 * torch.rand(16, 3, 8, 8)
    y = torch.randint(0, 5, (16,))

    def per_example(x_in):
        with torch.no_grad():
            z = model(x_in)
            if loss == "ce":
                return F.cross_entropy(z, y, reduction="none")
            if loss == "kl":
                p = F.softmax(model(x), 1)
                return (p * (p.log() - F.log_softmax(z, 1))).sum(1)
            return dynat.margin_loss(z, y)

    x_adv, _ = dynat.perturb(model, x, y, epsilon=EPS, step_size=STEP, num_steps=5, loss=loss)
    assert (per_example(x_adv) > per_example(x) + 1e-4).all()
    assert (x_adv - x).abs().max() > EPS / 2  # it moved well into the ball


def test_margin_loss():
    z = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    y = torch.tensor([0, 2])
    assert dynat.margin_loss(z, y).tolist() == [-1.0, 6.0]


# ----------------------------------------------------------------------------- 4. L_t never sees y

@pytest.mark.parametrize("kw", [dict(), dict(inner=True), dict(reweight="mail"), dict(inner=True, reweight="gairat"),
                                dict(labels="lbgat"), dict(alpha=1.0, awp_gamma=0.005, iseat=0.1, label_smoothing=0.1),
                                dict(inner=True, reweight="mail", awp_gamma=0.005, iseat=0.1)],
                         ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "base")
def test_target_gradient_does_not_depend_on_y_with_dynamic_labels(kw):
    target, guide = make_models()
    x, y = make_batch()
    y2 = (y + torch.randint(1, C, y.shape, generator=torch.Generator().manual_seed(5))) % C
    assert (y2 != y).all()
    out = []
    for labels in (y, y2):
        loss, stats, t, g = call_loss(target, guide, x, labels, seed=11, **kw)
        loss.backward()
        out.append((stats, grads(t), grads(g)))
    (s1, t1, g1), (s2, t2, g2) = out
    assert all(torch.equal(a, b) for a, b in zip(t1, t2))
    assert torch.equal(s1["loss_target"], s2["loss_target"])
    assert not all(torch.equal(a, b) for a, b in zip(g1, g2))  # the guide's CE (Eq. 4) does see y


@pytest.mark.parametrize("inner", [False, True])
def test_target_gradient_depends_on_y_with_true_labels(inner):
    target, _ = make_models()
    x, y = make_batch()
    y2 = (y + 1) % C
    out = []
    for labels in (y, y2):
        loss, _, t, _ = call_loss(target, None, x, labels, seed=11, labels="true", inner=inner)
        loss.backward()
        out.append(grads(t))
    assert not all(torch.equal(a, b) for a, b in zip(*out))


# ----------------------------------------------------------------------------- 5. --labels true builds no guide

def test_main_labels_true_builds_and_saves_no_guide(tmp_path, monkeypatch, one_thread_and_signals):
    built, ours = [], dynat.models
    real_build = ours.build_model
    monkeypatch.setattr(ours, "build_model", lambda name, classes: built.append(name) or real_build(name, classes))
    rc = dynat.main(["--dataset", "synthetic", "--labels", "true", "--target", "wrn-10-1", "--epochs", "1",
                     "--batch-size", "32", "--num-steps", "2", "--dry-run", "--out-dir", str(tmp_path / "o"),
                     "--eval-pgd-n", "8", "--device", "cpu"])
    assert rc == 0
    assert built == ["wrn-10-1"]  # the target only (the default --guide resnet18 is never built)
    ckpt = torch.load(tmp_path / "o" / "last.pt", weights_only=True)
    assert ckpt["guide"] is None
    assert set(ckpt["target"]) == set(models.build_model("wrn-10-1", 10).state_dict())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["target"])
    assert ckpt["args"]["labels"] == "true"


# ----------------------------------------------------------------------------- 6. AWP

def reference_target_loss(model, x, x_adv, y, beta=1.0, alpha=0.0, labels="true", logits_guide=None,
                          label_smoothing=0.0):
    """beta L_t + alpha KL of SPEC section 2 (the target's terms of Eq. 6), written out independently."""
    z_adv = model(x_adv)
    if labels == "lbgat":
        per = ((z_adv - logits_guide) ** 2).mean(1)
    else:
        per = F.cross_entropy(z_adv, y, reduction="none", label_smoothing=label_smoothing)
    loss = beta * per.mean()
    if alpha > 0:
        z_nat = model(x)
        loss = loss + alpha * (F.softmax(z_nat, 1) * (F.log_softmax(z_nat, 1) - F.log_softmax(z_adv, 1))).sum(1).mean()
    return loss


def proxy_perturbation(target, x, x_adv, y, gamma, lr=0.01, **terms):
    """AWP with a literal proxy (Wu et al. 2020): a copy takes one plain SGD step that increases
    the target's loss; v = ||w|| d / (||d|| + 1e-20) with d = w_proxy - w; returns gamma * v."""
    proxy = copy.deepcopy(target).train()
    optimizer = torch.optim.SGD(proxy.parameters(), lr=lr)
    optimizer.zero_grad()
    (-reference_target_loss(proxy, x, x_adv, y, **terms)).backward()
    optimizer.step()
    w, w_proxy = dict(target.named_parameters()), dict(proxy.named_parameters())
    out = {}
    for n in weight_keys(target):
        d = w_proxy[n].detach() - w[n].detach()
        out[n] = gamma * w[n].detach().norm() * d / (d.norm() + 1e-20)
    return out


def perturbed(model, delta):
    """A copy of `model` whose weights are written as w + delta."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            if n in delta:
                p.add_(delta[n])
    return out


@pytest.mark.parametrize("kw", [dict(alpha=1.0, beta=0.2), dict(inner=True, labels="lbgat"),
                                dict(inner=True, labels="true", label_smoothing=0.1, alpha=1.0),
                                dict(labels="dynamic", alpha=1.0, beta=6.0, inner=True)],
                         ids=["kl-alpha1-beta0.2", "lbgat-inner", "true-inner-ls", "dynamic-beta6"])
def test_awp_is_a_literal_proxy_step_and_the_target_trains_at_w_plus_v(spy, kw):
    """float64: the target term dynat_loss reports is the target's own loss at w + gamma v, where v is the
    per-layer-rescaled step of a literal proxy on that same loss (labels, terms); the proxy's learning
    rate cancels; and the test tells a wrong perturbation (-v) apart."""
    target, guide = make_models(dtype=torch.float64)
    x, y = make_batch(dtype=torch.float64)
    loss, stats, _, _ = call_loss(target, guide, x, y, awp_gamma=0.005, **kw)
    labels = kw.get("labels", "dynamic")
    terms = dict(beta=kw.get("beta", 1.0), alpha=kw.get("alpha", 0.0), labels=labels,
                 label_smoothing=kw.get("label_smoothing", 0.0))
    if labels == "lbgat":
        terms["logits_guide"] = copy.deepcopy(guide)(x).detach()
    v = proxy_perturbation(target, x, spy["x_adv"], spy["y_attack"], 0.005, **terms)
    other_lr = proxy_perturbation(target, x, spy["x_adv"], spy["y_attack"], 0.005, lr=0.3, **terms)
    for n in v:
        torch.testing.assert_close(v[n], other_lr[n], rtol=1e-6, atol=1e-12)
    expected = reference_target_loss(perturbed(target, v), x, spy["x_adv"], spy["y_attack"], **terms).detach()
    torch.testing.assert_close(stats["loss_target"], expected, rtol=1e-10, atol=1e-12)
    wrong = reference_target_loss(perturbed(target, {n: -d for n, d in v.items()}), x, spy["x_adv"], spy["y_attack"],
                                  **terms).detach()
    assert abs(wrong - expected) > 1e-6 * abs(expected)
    assert set(v) == weight_keys(target)  # conv and linear weights only, as the proxy's d = w_proxy - w


def test_awp_leaves_a_frozen_weight_unperturbed_as_the_proxy_does(spy):
    target, guide = make_models(dtype=torch.float64)
    x, y = make_batch(dtype=torch.float64)
    target.conv1.weight.requires_grad_(False)  # e.g. a frozen stem while fine-tuning
    _, stats, _, _ = call_loss(target, guide, x, y, awp_gamma=0.005, labels="true", inner=True)
    v = proxy_perturbation(target, x, spy["x_adv"], spy["y_attack"], 0.005)
    assert not v["conv1.weight"].any()
    expected = reference_target_loss(perturbed(target, v), x, spy["x_adv"], spy["y_attack"]).detach()
    torch.testing.assert_close(stats["loss_target"], expected, rtol=1e-10, atol=1e-12)


def _awp_net():
    """No BatchNorm: the loss of a batch split over processes is then the weighted mean of the parts' losses."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, C)).double()


def _awp_worker(rank, port, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        x, y = make_batch(b=8, size=8, dtype=torch.float64)
        part = slice(0, 5) if rank == 0 else slice(5, 8)  # unequal shares, 5 and 3
        dynat.perturb = no_attack
        _, stats = dynat.training_loss(_awp_net(), None, x[part], y[part], AWP_EXACT)
        torch.save(stats["loss_target"] * len(x[part]), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def no_attack(model, x, y, **kw):
    """x' = x: with no random start the one-process and two-process losses can agree to the last bits."""
    return x, torch.zeros_like(y)


# an AWP step large enough to tell directions apart
AWP_EXACT = dynat.Config(labels="true", num_steps=0, awp=True, awp_gamma=0.1)


def test_awp_under_two_processes_perturbs_along_the_global_batch_gradient(tmp_path, monkeypatch):
    """Under torchrun each process holds part of the batch; v must follow the whole batch's gradient (one
    all-reduce), as in one process. Each process's loss at w + v, weighted by its share, then sums to the
    one-process loss of the whole batch at its w + v; a v of each part's own gradient misses it by ~1e-2."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_awp_worker, args=(port, str(tmp_path)), nprocs=2)
    x, y = make_batch(b=8, size=8, dtype=torch.float64)
    monkeypatch.setattr(dynat, "perturb", no_attack)
    _, stats = dynat.training_loss(_awp_net(), None, x, y, AWP_EXACT)
    parts = sum(torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    torch.testing.assert_close(parts / len(x), stats["loss_target"], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- 7. GAIRAT and MAIL at any class count

@pytest.mark.parametrize("reweight,labels", [("gairat", "true"), ("mail", "true"), ("mail", "dynamic")])
def test_reweighting_equals_eq6_by_hand_at_100_classes(spy, reweight, labels):
    """The MAIL release hard-codes 10 classes; ours is any class count. Half the labels are the target's own
    eval-mode prediction: GAIRAT's kappa then varies across the batch, so the weights matter."""
    target, guide = make_models(classes=100)
    x, y = make_batch(classes=100)
    with torch.no_grad():
        y[:4] = target.eval()(x[:4]).argmax(1)
    target.train()
    loss, stats, _, _ = call_loss(target, guide, x, y, seed=5, reweight=reweight, labels=labels, inner=True,
                                  num_steps=3, epsilon=1 / 255, step_size=0.5 / 255)
    kw = dict(labels=labels, num_steps=3)
    ref, _ = reference_loss(copy.deepcopy(target), copy.deepcopy(guide), x, y, spy["x_adv"], spy["kappa"],
                            reweight=reweight, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    unweighted, _ = reference_loss(copy.deepcopy(target), copy.deepcopy(guide), x, y, spy["x_adv"], spy["kappa"], **kw)
    assert not torch.allclose(ref, unweighted)  # the weights matter here: the test can tell them apart


# ----------------------------------------------------------------------------- 8. learning-rate schedule

def schedule(epochs):
    return dynat.get_parser().parse_args(["--epochs", str(epochs)])


@pytest.mark.parametrize("epoch,lr", [(1, 0.02), (2, 0.1), (75, 0.1), (76, 0.01), (90, 0.01), (91, 0.001),
                                      (100, 0.001)])
def test_learning_rate_100_epochs(epoch, lr):
    assert dynat.learning_rate(schedule(100), epoch) == (epoch, pytest.approx(lr, rel=1e-12))


@pytest.mark.parametrize("epoch,lr", [(1, 0.02), (2, 0.1), (7, 0.1), (8, 0.01), (9, 0.01), (10, 0.001)])
def test_learning_rate_milestones_scale_with_epochs(epoch, lr):
    assert dynat.learning_rate(schedule(10), epoch)[1] == pytest.approx(lr, rel=1e-12)


def test_config_defaults_are_the_flags_defaults():
    """One home for each default: the parser takes the algorithm's from Config; the radius and step, by --norm."""
    args, c = dynat.get_parser().parse_args([]), dynat.Config()
    dynat.validate_args(args)  # fills in --epsilon and --step-size from Config's threat-model defaults
    for f in dataclasses.fields(dynat.Config):
        if f.name not in ("awp", "fat_tau"):  # --awp: a switch, off as Config's; --fat-tau: a schedule, off as -1
            assert getattr(args, f.name) == getattr(c, f.name), f.name
    assert not args.awp and not c.awp and args.epsilon == 8 / 255 and args.step_size == 2 / 255
    l2 = dynat.get_parser().parse_args(["--norm", "l2"])
    dynat.validate_args(l2)
    assert (l2.epsilon, l2.step_size) == (128 / 255, 15 / 255) == (dynat.Config(norm="l2").epsilon, 15 / 255)
    assert "8/255 (L-inf; the paper writes 0.031), 128/255 (L2)" in " ".join(dynat.get_parser().format_help().split())
    assert "None" not in dynat.get_parser().format_help()


# ----------------------------------------------------------------------------- 9. models

@pytest.mark.parametrize("name,count", [("resnet18", 11_173_962), ("wrn-34-10", 46_160_474)])
def test_parameter_counts(name, count):
    assert sum(p.numel() for p in models.build_model(name, 10).parameters()) == count


@pytest.mark.parametrize("name", ["wrn-10-1", "wrn-16-2"])
@pytest.mark.parametrize("size,classes", [(32, 10), (64, 10), (32, 100)])
def test_model_output_shapes(name, size, classes):
    torch.manual_seed(0)
    model = models.build_model(name, classes)
    out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, classes) and torch.isfinite(out).all()
    assert not any(k.startswith("sub_block1") for k in model.state_dict())


def test_resnet18_forward_shape():
    torch.manual_seed(0)
    assert models.build_model("resnet18", 100)(torch.rand(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", ["wrn-12-2", "wrn-34-0", "wrn-4-1", "foo", "resnet-18", "wrn-34"])
def test_invalid_architecture_names_raise_value_error(name):
    with pytest.raises(ValueError):
        models.build_model(name, 10)
    with pytest.raises(ValueError):
        models.check_arch(name)


def test_remap_state_dict_strips_prefixes_and_drops_sub_block1():
    torch.manual_seed(0)
    model = models.build_model("wrn-10-1", 10)
    own = model.state_dict()
    foreign = {}
    for i, (k, v) in enumerate(own.items()):
        foreign[("module.", "_orig_mod.", "module._orig_mod.")[i % 3] + k] = v
    foreign["module.sub_block1.layer.0.conv1.weight"] = torch.zeros(1)
    foreign["sub_block1.layer.0.bn1.weight"] = torch.zeros(1)
    out, notes = models.remap_state_dict(foreign)
    assert list(out) == list(own)
    assert all(out[k] is own[k] for k in own)
    text = " ".join(notes)
    assert "module." in text and "_orig_mod." in text and "sub_block1" in text and "2" in text
    models.build_model("wrn-10-1", 10).load_state_dict(out, strict=True)
    same, notes = models.remap_state_dict(own)
    assert list(same) == list(own) and notes == []


# ----------------------------------------------------------------------------- 10. ISEAT

@pytest.mark.parametrize("labels", ["dynamic", "true", "lbgat"])
def test_iseat_term_zero_without_any_perturbation(labels, monkeypatch):
    target, guide = make_models()
    x, y = make_batch()
    _, stats, _, _ = call_loss(target, guide, x, y, labels=labels, iseat=0.1)  # x' != x
    assert stats["loss_iseat"].item() > 0
    monkeypatch.setattr(dynat, "perturb", no_attack)  # x' = x
    _, stats, _, _ = call_loss(target, guide, x, y, labels=labels, iseat=0.1)
    assert stats["loss_iseat"].item() == 0.0
    _, stats, _, _ = call_loss(target, guide, x, y, labels=labels, iseat=0.1, awp_gamma=0.005)
    assert stats["loss_iseat"].item() > 0  # the weight perturbation alone moves the logits


@pytest.mark.parametrize("awp_gamma", [0.0, 0.005])
def test_iseat_term_value_and_gradient_through_both_logit_sets(spy, awp_gamma):
    """ISEAT's term by hand (float64): rank weights k/B by vulnerability, logits at w + gamma v (the literal
    proxy's v) against the clean ones at w, the gradient through both; a one-sided gradient is told apart."""
    target, guide = make_models(dtype=torch.float64)
    x, y = make_batch(dtype=torch.float64)
    lam = 0.1
    base, _, t0, _ = call_loss(target, guide, x, y, seed=9, inner=True, awp_gamma=awp_gamma)
    base.backward()
    loss, stats, t1, _ = call_loss(target, guide, x, y, seed=9, inner=True, awp_gamma=awp_gamma, iseat=lam)
    loss.backward()
    iseat_grad = [a.grad - b.grad for a, b in zip(t1.parameters(), t0.parameters())]

    def term(detach_clean):
        t = copy.deepcopy(target)
        delta = proxy_perturbation(target, x, spy["x_adv"], spy["y_attack"], awp_gamma) if awp_gamma > 0 else {}
        params = {n: p + delta[n] for n, p in t.named_parameters() if n in delta}
        z_adv = functional_call(t, params, (spy["x_adv"],))
        z_nat = t(x)
        y_t = spy["y_attack"]
        av = (F.cross_entropy(z_adv, y_t, reduction="none") - F.cross_entropy(z_nat, y_t, reduction="none")).detach()
        w = (av.argsort().argsort() + 1).double() / len(av)
        z_nat = z_nat.detach() if detach_clean else z_nat
        value = lam * (w * (z_adv - z_nat).pow(2).sum(1)).mean()
        return value, torch.autograd.grad(value, list(t.parameters()))

    value, ref_grad = term(detach_clean=False)
    torch.testing.assert_close(stats["loss_iseat"], value.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss.detach(), base.detach() + value.detach(), rtol=1e-9, atol=1e-12)
    for a, b in zip(iseat_grad, ref_grad):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    _, half_grad = term(detach_clean=True)  # the test can tell a one-sided gradient apart
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=1e-10) for a, b in zip(iseat_grad, half_grad))


def test_iseat_composes_with_awp_and_every_variant():
    target, guide = make_models()
    x, y = make_batch()
    loss, stats, t, g = call_loss(target, guide, x, y, inner=True, alpha=1.0, awp_gamma=0.005, iseat=0.1,
                                  reweight="mail", label_smoothing=0.1)
    assert torch.isfinite(loss) and stats["loss_iseat"] > 0
    loss.backward()
    for p in itertools.chain(t.parameters(), g.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in t.parameters())


def test_trades_style_wrn_checkpoint_loads_after_logged_mapping():
    # Key names of the TRADES/AWP/LBGAT WideResNet (camelCase shortcut, unused sub_block1,
    # DataParallel's module. prefix): such a checkpoint must load strictly after the mapping.
    model = models.build_model("wrn-16-2", 10)
    ours = model.state_dict()
    for key in ("conv1.weight", "block1.layer.0.convShortcut.weight", "block2.layer.0.convShortcut.weight",
                "block3.layer.1.bn2.running_var", "bn1.num_batches_tracked", "fc.weight", "fc.bias"):
        assert key in ours, key
    trades = {f"module.{k}": v.clone() for k, v in ours.items()}
    trades.update({f"module.sub_{k}": v.clone() for k, v in ours.items() if k.startswith("block1.")})
    notes = []
    fresh = models.build_model("wrn-16-2", 10)
    dynat_runs.load_weights(fresh, trades, "trades.pt", log=notes.append)
    assert any("module." in n for n in notes) and any("sub_block1" in n for n in notes)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in ours.items())


# ----------------------------------------------------------------------------- 10. the release's BatchNorm statistics

def first_bn_moments(conv_weight, inputs):
    """Batch mean and unbiased variance per channel of the first conv's output: what the first
    BatchNorm of the WRN (pre-activation: bn1 of the first block) sees."""
    z = F.conv2d(inputs, conv_weight, padding=1).double()
    n = z.numel() / z.shape[1]
    mean = z.mean((0, 2, 3))
    return mean, z.var((0, 2, 3), unbiased=False) * n / (n - 1)


@pytest.mark.parametrize("clean_bn", [True, False])
@pytest.mark.parametrize("awp_gamma", [0.0, 0.005])
def test_target_bn_statistics_are_the_releases_adversarial_then_clean(spy, clean_bn, awp_gamma):
    """The release runs f_t(x') then f_t(x) in train mode (at w + delta under AWP): running statistics
    m <- (1 - mom) m + mom * batch, first with x', then with x. Recomputed by hand at the first BN."""
    target, guide = make_models()
    x, y = make_batch()
    bn = target.block1.layer[0].bn1
    m0, v0, mom = bn.running_mean.double().clone(), bn.running_var.double().clone(), bn.momentum
    torch.manual_seed(0)
    before = copy.deepcopy(target)
    dynat.training_loss(target, guide, x, y, config(inner=True, awp_gamma=awp_gamma, clean_bn=clean_bn))
    delta = proxy_perturbation(before, x, spy["x_adv"], spy["y_attack"], awp_gamma) if awp_gamma else {}
    w = target.conv1.weight.detach() + delta.get("conv1.weight", 0)
    mean_adv, var_adv = first_bn_moments(w, spy["x_adv"])
    mean, var = (1 - mom) * m0 + mom * mean_adv, (1 - mom) * v0 + mom * var_adv
    if clean_bn:
        mean_nat, var_nat = first_bn_moments(w, x)
        mean, var = (1 - mom) * mean + mom * mean_nat, (1 - mom) * var + mom * var_nat
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-4, atol=1e-6)
    assert bn.num_batches_tracked.item() == (2 if clean_bn else 1)


# ----------------------------------------------------------------------------- 11. precision and scoring

class Confident(nn.Module):
    """A wrn-10-1 whose logits are scaled by 1000: p_y = 1 in float32, so its CE input gradient is tiny."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = models.build_model("wrn-10-1", C)

    def forward(self, x):
        return 1000 * self.net(x)


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_attack_moves_the_pixels_under_every_amp(amp, loss):
    """fp16's input gradient underflows to 0 on a confident model and sign(0) = 0 would freeze PGD:
    under any --amp the attack must move all but a few pixels by at least half a step."""
    model = Confident().eval()
    x, _ = make_batch(16)
    with torch.no_grad():
        y = model(x).argmax(1)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    with dynat_runs.autocast(cpu, dynat_runs.amp_dtype(amp, cpu)):  # the caller's precision
        x_adv, _ = dynat.perturb(model, x, y, epsilon=EPS, step_size=STEP, num_steps=10, loss=loss)
    unmoved = ((x_adv - x).abs() < STEP / 2).float().mean().item()
    assert unmoved < 0.05, f"{unmoved:.1%} of the pixels never moved under --amp {amp}"


def test_the_attack_precision_is_the_callers_but_never_fp16():
    cpu = torch.device("cpu")
    with torch.autocast("cpu", dtype=torch.float16), dynat.no_fp16(cpu):
        assert not torch.is_autocast_enabled("cpu")  # float32 on a CPU
    with torch.autocast("cpu", dtype=torch.bfloat16), dynat.no_fp16(cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    with dynat.no_fp16(cpu):
        assert not torch.is_autocast_enabled("cpu")


def test_amp_auto_and_the_attack_pick_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    # A GPU that supports bf16 only by emulation (e.g. a V100): is_bf16_supported() is True by default.
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")  # fp16 on it
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.float16)
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype=None, enabled=True: (device_type, dtype, enabled))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert dynat_runs.amp_dtype("auto", gpu) is None
    assert dynat.no_fp16(gpu) == ("cuda", None, False)  # float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere+
    assert dynat_runs.amp_dtype("auto", gpu) is torch.bfloat16
    assert dynat.no_fp16(gpu) == ("cuda", torch.bfloat16, True)
    assert dynat_runs.amp_dtype("auto", torch.device("cpu")) is None


def test_classify_counts_a_point_robust_only_if_correct_at_every_iterate(monkeypatch):
    """An attack that misclassified a point at some iterate and returned to a correct one has broken it."""
    target, _ = make_models()
    x = (torch.rand(6, 3, 16, 16) * 255).to(torch.uint8)
    with torch.no_grad():
        y = target.eval()(x.float() / 255).argmax(1)  # every clean point correct
    target.train()
    steps = 3
    kappa = torch.tensor([3, 2, 0, 3, 1, 3])  # iterates before the last still classified as y

    def perturb(model, xb, yb, **kw):  # returns the clean point: the last iterate is correct
        return xb, kappa[:len(yb)]
    monkeypatch.setattr(dynat, "perturb", perturb)
    attack = dynat.pgd(epsilon=EPS, step_size=STEP, num_steps=steps, loss="ce", start="uniform")
    pred, correct = dynat_runs.classify(target, x, y, device=torch.device("cpu"), attack=attack)
    assert torch.equal(pred, y)
    assert correct.tolist() == (kappa == steps).tolist()
    assert torch.equal(dynat_runs.robust_mask(target, x, y, attack, device=torch.device("cpu")), kappa == steps)


def test_classify_fixed_shape_pads_every_forward_to_one_batch_shape():
    target, _ = make_models()
    x = (torch.rand(11, 3, 16, 16) * 255).to(torch.uint8)
    y = torch.randint(0, C, (11,))
    shapes = []
    target.register_forward_pre_hook(lambda m, inp: shapes.append(inp[0].shape[0]))
    kw = dict(device=torch.device("cpu"), batch_size=4)
    plain = dynat_runs.classify(target, x, y, **kw)
    assert shapes == [4, 4, 3]
    shapes.clear()
    padded = dynat_runs.classify(target, x, y, fixed_shape=True, **kw)
    assert shapes == [4, 4, 4]
    assert torch.equal(plain[0], padded[0]) and torch.equal(plain[1], padded[1]) and len(padded[0]) == 11
    shapes.clear()
    attack = dynat.pgd(epsilon=EPS, step_size=STEP, num_steps=2, loss="ce", start="uniform")
    dynat_runs.classify(target, x[:3], y[:3], fixed_shape=True, attack=attack, **kw)
    assert set(shapes) == {4}


def test_global_batchnorm_variance_is_never_negative(tmp_path):
    """E[x^2] - mean^2 rounds below 0 for a large mean and a tiny spread (here by up to -0.08): clamped."""
    import torch.distributed as dist
    torch.manual_seed(0)
    x = (300 + 200 * torch.rand(1, 4, 1, 1)) + 1e-3 * torch.rand(8, 4, 5, 5)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        bn = dynat_runs.GlobalBatchNorm2d(4).train()
        out = bn(x)
    finally:
        dist.destroy_process_group()
    assert torch.isfinite(out).all() and (bn.running_var >= 0).all()


# ----------------------------------------------------------------------------- 12. collapse detection

def epoch_row(epoch, dyn, acc, pred_classes):
    return {"epoch": epoch, "dynamic_label_acc": dyn, "target_clean_acc": acc, "target_pred_classes": pred_classes}


@pytest.mark.parametrize("row,fires", [
    (epoch_row(2, 0.60, 0.10, 1), "is dead"),                     # one class for every image
    (epoch_row(4, 0.74, 0.30, 10), "far behind"),                  # stunted: under half its labels' accuracy
    (epoch_row(1, 0.60, 0.10, 1), None),                           # its first epoch: too early to say
    (epoch_row(2, 0.15, 0.10, 1), None),                           # labels at chance: nothing to learn yet
    (epoch_row(4, 0.80, 0.70, 10), None),                          # healthy
    (epoch_row(2, 0.74, 0.30, 10), None),                          # behind, but in its first epochs
    ({**epoch_row(4, None, 0.10, 1)}, None),                       # no guide (--labels true)
])
def test_collapse_warning(row, fires):
    warning = dynat.collapse_warning(row, classes=10, first_target_epoch=1, steps_per_epoch=24)
    if fires is None:
        assert warning is None
    else:  # the remedy sized for ~80 guide steps: 4 epochs of 24 steps
        assert fires in warning and "--guide-warmup 4" in warning and f"epoch {row['epoch']}" in warning


def test_the_warning_never_recommends_the_warm_up_the_run_already_had():
    behind = epoch_row(7, 0.6, 0.1, 10)
    assert "--guide-warmup 4 " in dynat.collapse_warning(behind, 10, 3, 24, guide_warmup=2)  # ~80 steps > 2 epochs
    assert "--guide-warmup 8 " in dynat.collapse_warning(behind, 10, 5, 24, guide_warmup=4)  # had ~80: double it


# ----------------------------------------------------------------------------- 13. the comparison methods

def record_train_forwards(model, x, seen):
    """Record each train-mode forward of `model` as "x" (the clean batch) or "x'" (anything else: the attack's)."""
    def hook(m, inp):  # returns None: the input goes on unchanged
        if m.training:
            seen.append("x" if torch.equal(inp[0], x) else "x'")
    return model.register_forward_pre_hook(hook)


def test_trades_at_alpha_zero_is_clean_cross_entropy():
    target, _ = make_models()
    x, y = make_batch()
    loss, _, t1, _ = call_loss(target, None, x, y, labels="true", loss="trades", alpha=0.0)
    loss.backward()
    t2 = copy.deepcopy(target)
    ref = F.cross_entropy(t2(x), y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for a, b in zip(t1.parameters(), t2.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("clean_bn,order", [(True, ["x", "x'", "x"]), (False, ["x", "x'"])])
def test_trades_by_hand_with_its_releases_batchnorm_order(spy, clean_bn, order):
    """TRADES: CE(f(x), y) + alpha KL(p(f(x)) || p(f(x'))) on the KL attack; train-mode forwards x, x' (and x
    again with --clean-bn: the TRADES release's model(x_natural) in its KL term); MART's too start with x."""
    target, _ = make_models(dtype=torch.float64)
    x, y = make_batch(dtype=torch.float64)
    seen, t1 = [], copy.deepcopy(target)
    record_train_forwards(t1, x, seen)
    torch.manual_seed(3)
    loss, _ = dynat.training_loss(t1, None, x, y, config(labels="true", loss="trades", alpha=6.0, clean_bn=clean_bn))
    assert spy["attack"]["loss"] == "kl" and seen == order
    t2 = copy.deepcopy(target)
    z_nat, z_adv = t2(x), t2(spy["x_adv"])
    p = F.softmax(z_nat, 1)
    ref = F.cross_entropy(z_nat, y) + 6.0 * (p * (F.log_softmax(z_nat, 1) - F.log_softmax(z_adv, 1))).sum(1).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    seen.clear()
    dynat.training_loss(t1, None, x, y, config(labels="true", loss="mart", alpha=6.0, inner=True, clean_bn=False))
    assert seen == ["x", "x'"]
    seen.clear()
    dynat.training_loss(t1, None, x, y, config(labels="true", inner=True, alpha=1.0))  # DYNAT's alpha: x' first
    assert seen == ["x'", "x"]


def spy_perturb(real, spy, *a, **kw):
    x_adv, kappa = real(*a, **kw)
    spy.update(x_adv=x_adv, kappa=kappa, y_attack=a[2].clone(), attack=kw)
    return x_adv, kappa


def test_mart_by_hand_its_kl_weighted_by_one_minus_p_y_of_the_clean_image(spy):
    """MART: BCE(f(x'), y) + alpha mean_i KL_i(p(f(x)) || p(f(x'))) (1 - p_y(f(x_i))), its release's epsilons; the
    CE attack on y."""
    target, _ = make_models(dtype=torch.float64)
    x, y = make_batch(dtype=torch.float64)
    loss, _, t1, _ = call_loss(target, None, x, y, labels="true", loss="mart", alpha=6.0, inner=True, clean_bn=False)
    assert spy["attack"]["loss"] == "ce" and torch.equal(spy["y_attack"], y)
    loss.backward()
    t2 = copy.deepcopy(target)
    z_nat, z_adv = t2(x), t2(spy["x_adv"])
    p_nat, p_adv = F.softmax(z_nat, 1), F.softmax(z_adv, 1)
    wrong = p_adv.masked_fill(F.one_hot(y, C).bool(), -1).argmax(1)  # the likeliest wrong class on x'
    bce = -torch.log(p_adv.gather(1, y[:, None]).squeeze(1)) - torch.log(1.0001 - p_adv.gather(1, wrong[:, None]).squeeze(1) + 1e-12)
    kl = (p_nat * (torch.log(p_nat) - torch.log(p_adv + 1e-12))).sum(1)
    weight = 1.0000001 - p_nat.gather(1, y[:, None]).squeeze(1)
    ref = bce.mean() + 6.0 * (kl * weight).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(t1.parameters(), t2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(ref, bce.mean() + 6.0 * kl.mean())  # the test tells the weighting apart


def test_fat_with_a_budget_beyond_k_and_no_noise_is_plain_pgd():
    target, _ = make_models()
    x, y = make_batch()
    runs = []
    for kw in (dict(), dict(fat_tau=5, fat_omega=0.0)):
        torch.manual_seed(0)
        runs.append(dynat.perturb(target, x, y, epsilon=EPS, step_size=STEP, num_steps=5, loss="ce", start="uniform", **kw))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("tau", [0, 1, 3])
def test_fat_stops_each_point_tau_steps_after_it_is_first_misclassified(tau):
    """AlwaysClassZero predicts class 0 everywhere: points of label 0 are never misclassified and run all K
    steps; points of another label are wrong from the start and stop after exactly tau steps."""
    model, (x, _) = AlwaysClassZero(), make_batch()
    y = torch.tensor([0, 1, 0, 2, 0, 1, 0, 2])
    k = 5
    torch.manual_seed(0)
    fat, _ = dynat.perturb(model, x, y, epsilon=EPS, step_size=STEP, num_steps=k, start="uniform", fat_tau=tau)
    for steps, points in ((k, y == 0), (tau, y != 0)):
        torch.manual_seed(0)
        plain, _ = dynat.perturb(model, x, y, epsilon=EPS, step_size=STEP, num_steps=steps, start="uniform")
        assert torch.equal(fat[points], plain[points]), steps
    torch.manual_seed(0)
    noisy, _ = dynat.perturb(model, x, y, epsilon=EPS, step_size=STEP, num_steps=k, start="uniform", fat_tau=tau,
                             fat_omega=0.01)
    assert not torch.equal(noisy[y == 0], fat[y == 0]) and (noisy - x).abs().max() <= EPS + 1e-6  # omega's noise


def test_sat_targets_move_towards_the_clean_predictions_and_weight_the_clean_ce():
    target, _ = make_models(dtype=torch.float64)
    x, y = make_batch(dtype=torch.float64)
    old = F.one_hot(y, C).double() * 0.7 + 0.03  # targets some steps along
    spy_calls = {}
    real = dynat.perturb
    torch.manual_seed(3)
    dynat_perturb = lambda *a, **kw: spy_perturb(real, spy_calls, *a, **kw)
    import unittest.mock as mock
    with mock.patch.object(dynat, "perturb", dynat_perturb):
        t1 = copy.deepcopy(target)
        loss, stats = dynat.training_loss(t1, None, x, y, config(labels="true", loss="trades", alpha=6.0, clean_bn=False,
                                                               sat_momentum=0.9), soft_labels=old)
    t2 = copy.deepcopy(target)
    z_nat, z_adv = t2(x), t2(spy_calls["x_adv"])
    soft = 0.9 * old + 0.1 * F.softmax(z_nat.detach(), 1)
    torch.testing.assert_close(stats["soft_labels"], soft, rtol=1e-12, atol=1e-12)
    w = soft.max(1).values
    w = w * len(w) / w.sum()
    p = F.softmax(z_nat, 1)
    ref = ((-(soft * F.log_softmax(z_nat, 1)).sum(1)) * w).mean() \
        + 6.0 * (p * (F.log_softmax(z_nat, 1) - F.log_softmax(z_adv, 1))).sum(1).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


def test_the_attack_start_and_the_inner_label_reach_the_attack(spy):
    target, guide = make_models()
    x, y = make_batch()
    call_loss(target, guide, x, y, inner=True, start="uniform", inner_label="true")
    assert spy["attack"]["start"] == "uniform" and torch.equal(spy["y_attack"], y)  # CE on y ...
    loss, stats, _, _ = call_loss(target, guide, x, y, seed=4, inner=True, inner_label="true")
    ref, y_t = reference_loss(copy.deepcopy(target), copy.deepcopy(guide), x, y, spy["x_adv"], spy["kappa"])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)  # ... while the target learns y_dyn
    assert not torch.equal(y_t, y)


@pytest.mark.parametrize("epoch,lr", [(1, 0.1), (59, 0.1), (60, 0.01), (89, 0.01), (90, 0.001), (109, 0.001),
                                      (110, 0.0005), (120, 0.0005)])
def test_learning_rate_milestones_and_factors_give_gairats_schedule(epoch, lr):
    args = dynat.get_parser().parse_args(["--epochs", "120", "--lr-milestones", "60,90,110", "--lr-factors",
                                          "0.1,0.01,0.005", "--lr-warm-start", "1"])
    assert dynat.learning_rate(args, epoch)[1] == pytest.approx(lr, rel=1e-12)


def test_float32_training_runs_without_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        dynat_runs.configure_backends(deterministic=False)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------- 14. the L2 threat model

@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
@pytest.mark.parametrize("start", ["normal", "uniform"])
def test_l2_every_iterate_stays_in_the_ball_and_the_box(loss, start):
    """perturb with K = k returns the k-th iterate of a longer run with the same seed: each one, per example,
    within the L2 ball (to rounding) and the [0, 1] box; and the attack moves."""
    target, _ = make_models()
    x, y = make_batch()
    x[0, 0, :4], x[1, 1, :4] = 0.0, 1.0  # pixels at the box edges
    eps = 0.5
    for k in range(5):
        torch.manual_seed(0)
        x_k, _ = dynat.perturb(target, x, y, epsilon=eps, step_size=0.2, num_steps=k, loss=loss, start=start, norm="l2")
        norms = (x_k - x).flatten(1).norm(dim=1)
        assert (norms <= eps * (1 + 1e-5)).all(), (k, norms.max())
        assert x_k.min() >= 0 and x_k.max() <= 1
    assert (norms > eps / 2).all()  # 4 steps of 0.2 reach well into the ball
    torch.manual_seed(0)
    x_start, _ = dynat.perturb(target, x, y, epsilon=eps, step_size=0.2, num_steps=0, start=start, norm="l2")
    if start == "uniform":  # a random direction at a radius U(0, eps): inside, not on the sphere
        r = (x_start - x).flatten(1).norm(dim=1)
        assert (r < eps).all() and r.std() > 0.01


def test_l2_epsilon_zero_returns_x_and_no_step_returns_a_valid_start():
    target, _ = make_models()
    x, y = make_batch()
    for start in ("normal", "uniform"):
        x_adv, _ = dynat.perturb(target, x, y, epsilon=0.0, step_size=0.2, num_steps=3, start=start, norm="l2")
        assert torch.equal(x_adv, x)
    x_adv, kappa = dynat.perturb(target, x, y, epsilon=0.5, step_size=0.2, num_steps=0, norm="l2")
    assert torch.isfinite(x_adv).all() and (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 and not kappa.any()


def test_l2_steps_go_along_the_normalised_gradient():
    """A linear model's CE gradient direction: one L2 step from the start moves x by step * g / ||g|| where
    neither the ball nor the box binds (nor the sign of L-inf's step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x, y = 0.3 + 0.4 * torch.rand(4, 3, 8, 8), torch.randint(0, 5, (4,))
    torch.manual_seed(1)
    start, _ = dynat.perturb(model, x, y, epsilon=10.0, step_size=0.05, num_steps=0, norm="l2")
    torch.manual_seed(1)
    one, _ = dynat.perturb(model, x, y, epsilon=10.0, step_size=0.05, num_steps=1, norm="l2")
    s = start.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model(s), y, reduction="sum"), s)
    expected = start + 0.05 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(one, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("inner", [False, True])
def test_dynat_loss_attacks_in_the_l2_ball_with_its_default_radius(spy, inner):
    target, guide = make_models()
    x, y = make_batch()
    loss, _, _, _ = call_loss(target, guide, x, y, norm="l2", inner=inner, epsilon=None, step_size=None)
    assert torch.isfinite(loss) and spy["attack"]["norm"] == "l2" and spy["attack"]["loss"] == ("ce" if inner else "kl")
    assert (spy["attack"]["epsilon"], spy["attack"]["step_size"]) == (128 / 255, 15 / 255)
    assert (spy["x_adv"] - x).flatten(1).norm(dim=1).max() <= 128 / 255 * (1 + 1e-5)


# ----------------------------------------------------------------------------- data augmentation

def test_training_batches_are_cropped_and_flipped_unless_augmentation_is_off():
    """Sec. 4.1's augmentation (4-pixel zero-padded crop, horizontal flip) on every batch; --no-augment (the
    Fashion-MNIST regime's setting) hands the images over as they are, in [0, 1]."""
    data = dynat.data
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(1, 256, (64, 3, 12, 12), dtype=torch.uint8, generator=g), torch.arange(64) % 10
    idx = torch.arange(64)
    plain, y = data.train_batch(images, labels, idx, "cpu", augmented=False)
    assert torch.equal(plain, images.float() / 255) and torch.equal(y, labels)
    torch.manual_seed(0)
    x, _ = data.train_batch(images, labels, idx, "cpu")
    padded = F.pad(images.float() / 255, (4, 4, 4, 4))
    for i in range(64):  # each image is one of the 9 x 9 crops of its padded self, or that crop mirrored
        crops = padded[i].unfold(1, 12, 1).unfold(2, 12, 1).permute(1, 2, 0, 3, 4).reshape(81, 3, 12, 12)
        assert any(torch.equal(x[i], c) or torch.equal(x[i], c.flip(-1)) for c in crops), i
    assert (x != plain).flatten(1).any(1).float().mean() > 0.8  # almost every image moved


def test_the_runs_title_names_each_setting_off_the_papers_as_its_flag():
    """curves.png's title: 8/255 as the paper writes it, FAT's schedule as given, nothing for a setting left alone."""
    title = lambda *argv: dynat.run_title(resolved(argv))
    assert title() == "cifar10: wrn-34-10 target / resnet18 guide, DYNAT"
    assert title("--inner", "--epsilon", "0.031") == "cifar10: wrn-34-10 target / resnet18 guide, --epsilon 0.031 --inner"
    t = title("--labels", "true", "--inner", "--fat-tau", "0,1,2", "--fat-tau-milestones", "51,91", "--no-clean-bn",
              "--epsilon", "8/255", "--step-size", "0.007")
    assert t == "cifar10: wrn-34-10 target, --step-size 0.007 --inner --no-clean-bn --labels true --fat-tau 0,1,2"
    assert "()" not in t and "0.0313" not in t


def resolved(argv):
    args = dynat.get_parser().parse_args(list(argv))
    dynat.resolve_threat_model(args)
    return args


def test_help_opens_with_the_headline_commands_flags_and_builds_configs_from_its_fields(monkeypatch):
    """One home per setting: each Config field is a flag whose help is the comment beside the field; --help's
    usage fits in 3 lines and explains the headline command's flags within its first 40 lines, at 80 columns."""
    monkeypatch.setenv("COLUMNS", "80")
    text = dynat.get_parser().format_help()
    usage = text.split("\n\n")[0].splitlines()
    assert len(usage) <= 3 and usage[0].startswith("usage: python dynat.py")
    top = "\n".join(text.splitlines()[:40])
    for flag in ("--dataset", "--data-dir", "--target", "--guide", "--epochs", "--inner ", "--awp ", "--alpha",
                 "--beta", "--out-dir", "--resume"):
        assert flag in top, flag
    helps = dynat.config_help()
    assert set(helps) == {f.name for f in dataclasses.fields(dynat.Config)} and all(helps.values())
    assert helps["clean_bn"].startswith("the release's habit")  # continuation lines joined
    flat = " ".join(text.split())
    for name in ("awp_gamma", "reweight", "label_smoothing", "num_steps"):  # the field's comment is its flag's help
        assert " ".join(helps[name].split()) in flat, name
    groups = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert groups[1:] == ["data, models and the headline command:", "DYNAT's other variants (the paper's Tables 2-4), "
                          "and ours:", "the comparison methods (docs/reproducing.md):",
                          "threat model, data and schedule:", "precision, devices and processes:",
                          "evaluation during training:"]
