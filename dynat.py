"""DYNAT: dynamic-label adversarial training (Liu et al.), reference implementation.

Algorithm 1, one iteration on a clean batch (x, y) of [0, 1] pixels (dynat_loss, in the block to paste):
  1. Guide forward once, train mode, z_g = f_g(x); dynamic label y_dyn = argmax z_g, no gradient     (Eq. 3)
  2. Guide loss L_g = CE(z_g, y)                                                               (Eq. 4)
  3. Inner maximisation on the frozen, eval-mode target, K signed PGD steps in the eps-ball:
     CE(f_t(x'), y_dyn) with --inner (Eq. 7), else KL(p(f_t(x)) || p(f_t(x'))) (TRADES/LBGAT)  (Sec. 3.4)
  4. Target loss on x', train mode: L_t = CE(f_t(x'), y_dyn)                               (Eq. 5)
     [+ alpha KL(p(f_t(x)) || p(f_t(x'))), AWP on the target's weights, GAIRAT / MAIL weights, ISEAT]
  5. One SGD step of both models on L_g + beta L_t                                         (Eq. 6)
The comparison methods (PGD-AT, TRADES, SAT, MART, LBGAT; FAT and GAIRAT, MAIL-AT, AWP as PGD-AT's variants) are
functions of their own after dynat_loss in the same block, sharing its attack, AWP and instance weights.

Headline row (Table 2, CIFAR-100, DYNAT-Inner-AWP alpha=1, beta=0.2):
  python dynat.py --dataset cifar100 --inner --awp --alpha 1 --beta 0.2
Last measured result: none of the paper's rows (CIFAR, 100 epochs) has been run with this code yet; on real
images on a CPU, the README's Fashion-MNIST run and docs/fashion-mnist-regime.md.

Reading order: the flags; THE ALGORITHM (a torch-only block to paste whole); the training program around it.
What a run needs that is not the algorithm (files, checkpoints, resume, processes, curves) is dynat_runs.py's.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import signal
import sys
import time

import torch
import torch.distributed as dist

try:  # the training program's; dynat.py copied alone into a project still serves the block (from dynat import ...)
    from dynat_runs import (NOT_EVALUATED, STEP_STATS, STOP_SIGNALS, UsageError, add_flags, add_step, amp_dtype,
                            autocast, average_replicas, check_out_dir, check_replicas, checked, configure_backends,
                            epoch_batches, epoch_row, evaluate_epoch, exit_code, exit_process, fmt_fraction, fraction,
                            init_processes, load_weights, machine, metrics_before, ours, own_out_dir, plot_curves,
                            progress_bar, provenance, require, resolve_resume, save_checkpoint, step_seed,
                            stop_signals, synchronise_batchnorm, torchrun_notes, update_ema, write_atomic)
except ModuleNotFoundError as e:
    if e.name != "dynat_runs":
        raise
    alone = True
else:
    alone = False
    with ours("models", "data"):
        import data  # noqa: E402  (ours: models.py and data.py beside this file, even beside a research repo's models/)
        import models  # noqa: E402


# ----------------------------------------------------------------------------- arguments


@functools.cache
def config_help():
    """{field: help}: the comment beside each of Config's fields (and its continuation lines), so that a setting of
    the algorithm is written once, where the block defines it, and the command line is built from that."""
    helps, last = {}, None
    for line in inspect.getsource(Config).splitlines():
        field = re.match(r" {4}(\w+): [^=]+=[^#]*#\s*(.*)", line)
        if field:
            last, helps[field[1]] = field[1], field[2].strip()
        elif last and re.match(r" {8,}#", line):
            helps[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return helps


def config_flag(group, name, **kw):
    """Config's field `name` as --name: its default, and its comment as the help (`kw` changes either, for a
    script that uses the setting otherwise: evaluate.py's --epsilon, tools/bench.py's --awp)."""
    default = {f.name: f.default for f in dataclasses.fields(Config)}[name]
    if isinstance(default, bool):
        kw.setdefault("action", argparse.BooleanOptionalAction if default else "store_true")
    elif name in CHOICES:
        kw.setdefault("choices", CHOICES[name])
    else:
        kw.setdefault("type", type(default))
    kw.setdefault("help", config_help()[name])
    group.add_argument("--" + name.replace("_", "-"), **{"default": default, **kw})


def get_parser():
    """The flags, grouped, the headline command's first: each setting of the algorithm is Config's field (its default
    and comment, config_flag), each of the program's is dynat_runs.FLAGS's entry."""
    p = argparse.ArgumentParser(
        usage="python dynat.py [--dataset D] [--target A] [--guide A] [--epochs E] [--inner] [--awp] [--alpha A]\n"
              "                [--beta B] [--out-dir DIR] [--resume [DIR]] [options]   (all: --help)",
        description="DYNAT: dynamic-label adversarial training (Algorithm 1). Defaults are the paper's setting.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli = {  # how the command line takes a field otherwise than config_flag would. The radius and step depend on
        # --norm: "%(default).0s" keeps argparse from appending "(default: None)"
        "epsilon": dict(type=fraction, help="radius of the ball: 8/255 (L-inf; the paper writes 0.031), 128/255 (L2)"
                        "%(default).0s"),
        "step_size": dict(type=fraction, help="PGD step size: 2/255 (L-inf), 15/255 (L2)%(default).0s"),
        "iseat": dict(metavar="LAMBDA")}
    groups = (  # (title, the flags in order: a Config field, or a dynat_runs.FLAGS entry)
        ("data, models and the headline command", "dataset data_dir target guide epochs inner awp alpha beta out_dir "
         "resume"),
        ("DYNAT's other variants (the paper's Tables 2-4), and ours", "inner_label awp_gamma awp_warmup reweight "
         "gair_lambda mail_bias mail_slope iseat reweight_start label_smoothing clean_bn ema guide_warmup target_clip "
         "target_clip_epochs"),
        ("the comparison methods (docs/reproducing.md)", "labels loss fat_tau fat_tau_milestones fat_omega sat "
         "sat_momentum sat_start"),
        ("threat model, data and schedule", "norm epsilon step_size num_steps start batch_size lr lr_milestones "
         "lr_factors lr_warm_start momentum weight_decay train_size val_size augment"),
        ("precision, devices and processes", "seed deterministic device amp channels_last compile sync_bn workers "
         "overwrite"),
        ("evaluation during training", "eval_every eval_pgd_n dry_run"))
    fields = {f.name for f in dataclasses.fields(Config)} - {"fat_tau"}  # Config: one epoch's tau; the flag: a schedule
    for title, names in groups:
        g = p.add_argument_group(title)
        for name in names.split():
            if name in fields:
                config_flag(g, name, **cli.get(name, {}))
            else:
                add_flags(g, name)
    assert fields <= {a.dest for a in p._actions}, "a Config field without its flag"
    return p


def checked_config(**fields):
    """Config(**fields), whose refusal of a field (ValueError, TypeError) becomes a UsageError naming its flag."""
    try:
        return Config(**fields)
    except (ValueError, TypeError) as e:
        raise UsageError(re.sub(r"Config\.(\w+)=?", lambda m: f"--{m.group(1).replace('_', '-')} ", str(e))) from None


def config_of(args):
    """The Config of a run's flags (FAT's first tau; the loop sets each epoch's)."""
    return checked_config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if f.name != "fat_tau"},
                          fat_tau=(args.fat_tau or (-1,))[0])


def resolve_threat_model(args):
    """args.epsilon and args.step_size given args.norm's defaults where unset, then checked (dynat.py, evaluate.py)."""
    c = checked_config(norm=args.norm, epsilon=args.epsilon, step_size=args.step_size)
    args.epsilon, args.step_size = c.epsilon, c.step_size


def validate_args(args):
    """Every flag checked up front, with a one-line reason; the radius and step given their --norm's defaults."""
    resolve_threat_model(args)
    config_of(args)  # the algorithm's settings, checked where they are defined
    for name in ("target", "guide"):
        checked(models.check_arch, getattr(args, name), prefix=f"--{name}: ")
    require(args, ("epochs", "batch_size", "eval_every", "eval_pgd_n"), lambda v: v >= 1, ">= 1")
    require(args, ("val_size", "workers", "awp_warmup", "train_size", "guide_warmup", "target_clip_epochs"),
            lambda v: v >= 0, ">= 0")
    require(args, ("lr", "momentum", "weight_decay", "target_clip"), lambda v: v >= 0 and math.isfinite(v),
            "a finite number >= 0")
    require(args, ("lr_warm_start",), lambda v: 0 < v and math.isfinite(v), "a finite number > 0")
    require(args, ("ema",), lambda v: 0 <= v < 1, "in [0, 1)")
    for steps, values in (("lr_milestones", "lr_factors"), ("fat_tau_milestones", "fat_tau")):
        e, v = getattr(args, steps) or (), getattr(args, values) or ()
        extra = values == "fat_tau" and bool(v)  # taus: one before the first milestone, then one per milestone
        if len(v) != len(e) + extra or list(e) != sorted(set(e)) or any(m < 1 for m in e) or any(f < 0 for f in v):
            raise UsageError(f"--{steps.replace('_', '-')} {e} and --{values.replace('_', '-')} {v}: need increasing "
                             f"epochs >= 1 and {'one more' if extra else 'as many'} values >= 0")
    if args.sat and (args.loss != "trades" or args.labels != "true" or args.awp):
        raise UsageError("--sat is SAT's adversarial setting: it needs --loss trades --labels true, without --awp")
    if args.guide_warmup and args.labels == "true":
        raise UsageError(f"--guide-warmup {args.guide_warmup} needs a guide: --labels true trains none")
    if args.awp and args.awp_warmup > args.epochs:
        raise UsageError(f"--awp-warmup {args.awp_warmup} is beyond --epochs {args.epochs}: AWP would never switch on")
    if args.sat and args.sat_start > args.epochs:
        raise UsageError(f"--sat-start {args.sat_start} is beyond --epochs {args.epochs}: SAT would never switch on")
    if (args.reweight != "none" or args.iseat > 0) and args.reweight_start > args.epochs:
        raise UsageError(f"--reweight-start {args.reweight_start} is beyond --epochs {args.epochs}: "
                         "the reweighting would never switch on")
    if args.dataset == "imagefolder" and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")


# ============================================================================ BEGIN DYNAT BLOCK
# Algorithm 1 (dynat_loss), the one attack it shares with evaluation (perturb), and the comparison methods of the
# paper's tables, each in a function of its own after it. Torch only, no training loop: paste the block whole (the
# README's "Use it in your own code" gives the one-line sed that extracts it). Models see pixels in [0, 1].
import contextlib
import dataclasses
import math
import numbers

import torch
import torch.nn.functional as F
from torch.func import functional_call

RADII = {"linf": (8 / 255, 2 / 255), "l2": (128 / 255, 15 / 255)}  # (epsilon, step size) where Config leaves them None
CHOICES = {"norm": ("linf", "l2"), "inner_label": ("train", "true"), "start": ("normal", "uniform"),
           "reweight": ("none", "gairat", "mail"), "labels": ("dynamic", "true", "lbgat"),
           "loss": ("ce", "trades", "mart")}


@dataclasses.dataclass(frozen=True)
class Config:
    """One step's settings: Algorithm 1's, its variants', then the comparison methods'. The defaults are the paper's,
    except where a comment says "the release's habit". Checked when built: an unknown choice or a number that cannot
    be one raises ValueError or TypeError naming the field."""
    # Algorithm 1: the inner maximisation (Sec. 3.4) and Eq. 5-6
    norm: str = "linf"  # the threat model's ball: "linf" (the paper) or "l2"
    epsilon: float = None  # its radius in [0, 1] pixels; None: 8/255 (the paper writes 0.031); l2: 128/255
    step_size: float = None  # None: 2/255; l2: 15/255 (Rice et al. 2020's and AWP's CIFAR L2 setting)
    num_steps: int = 10  # K, the attack's steps
    inner: bool = False  # attack CE(f_t(x'), y_dyn) (Eq. 7, "-Inner" rows); False: the KL attack, the release's
                         # reading of the plain rows (a comment in its code; the paper names no attack there)
    inner_label: str = "train"  # the label of inner's CE attack: "train" the one the target learns (y_dyn), "true" y
    start: str = "normal"  # the release's habit (the paper names none): x + 0.001 N(0, I), as TRADES, MART, LBGAT;
                           # "uniform" in the ball (PGD-AT, AWP, GAIRAT, FAT)
    beta: float = 1.0  # weight of L_t in Eq. 6 (the paper: 1; 0.2 for the AWP rows on CIFAR-100)
    alpha: float = 0.0  # weight of TRADES's KL(p(f_t(x)) || p(f_t(x'))) added to the target's loss (DYNAT-AWP's alpha)
    clean_bn: bool = True  # the release's habit: a no-grad train-mode f_t(x) after f_t(x'), BN statistics of both
    # DYNAT's variants in the paper
    awp: bool = False  # adversarial weight perturbation of the target (Wu et al. 2020: the "-AWP" rows)
    awp_gamma: float = 0.005  # ||v_l|| / ||w_l|| per conv/linear weight
    reweight: str = "none"  # instance weights on the target's loss: "gairat" (Table 3) or "mail" (Table 4)
    gair_lambda: float = -1.0  # GAIRAT's lambda
    mail_bias: float = -0.5  # MAIL-AT's sigmoid bias (its release's README command)
    mail_slope: float = 10.0  # MAIL-AT's sigmoid slope
    iseat: float = 0.0  # ISEAT's lambda (Li et al. 2023; 0: off)
    label_smoothing: float = 0.0  # of the target's CE (the paper: 0.2 in Table 3's hybrids)
    # the comparison methods: training_loss picks the method's function from labels and loss
    labels: str = "dynamic"  # "dynamic": DYNAT; "true": y, no guide (PGD-AT, TRADES, MART, FAT, SAT); "lbgat": LBGAT
    loss: str = "ce"  # with labels "true": "ce" PGD-AT (FAT with fat_tau), "trades" TRADES (SAT), "mart" MART
    fat_tau: int = -1  # FAT's early-stopped PGD: a point stops at its (tau + 1)-th misclassified iterate (-1: off)
    fat_omega: float = 0.001  # FAT's noise omega N(0, I) on each of its steps
    sat_momentum: float = 0.9  # SAT's soft targets <- m soft + (1 - m) p(f_t(x))

    def __post_init__(self):
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"Config.{name}={getattr(self, name)!r}: not one of {', '.join(map(repr, choices))}")
        for name in ("inner", "clean_bn", "awp"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Config.{name}={getattr(self, name)!r}: must be True or False")
        for name, default in zip(("epsilon", "step_size"), RADII[self.norm]):
            object.__setattr__(self, name, default if getattr(self, name) is None else getattr(self, name))
        top = 1 if self.norm == "linf" else 100  # pixels are in [0, 1]; an L2 ball of radius 100 holds every image
        for name, kind, ok, what in (
                ("epsilon", numbers.Real, lambda v: 0 < v <= top, f"in (0, {top}] (pixels are in [0, 1])"),
                ("step_size", numbers.Real, lambda v: 0 < v <= top, f"in (0, {top}]"),
                ("num_steps", numbers.Integral, lambda v: v >= 0, ">= 0"),
                ("fat_tau", numbers.Integral, lambda v: v >= -1, ">= -1 (-1: off)"),
                *((n, numbers.Real, lambda v: 0 <= v < math.inf, "finite and >= 0")
                  for n in ("beta", "alpha", "awp_gamma", "iseat", "fat_omega")),
                *((n, numbers.Real, math.isfinite, "finite") for n in ("gair_lambda", "mail_bias", "mail_slope")),
                *((n, numbers.Real, lambda v: 0 <= v < 1, "in [0, 1)") for n in ("label_smoothing", "sat_momentum"))):
            v = getattr(self, name)
            if not isinstance(v, kind) or isinstance(v, bool):
                raise TypeError(f"Config.{name}={v!r}: must be a {'whole ' * (kind is numbers.Integral)}number")
            if not ok(v):
                raise ValueError(f"Config.{name}={v!r}: must be {what}")
        if self.inner_label == "true" and not self.inner:
            raise ValueError("Config.inner_label='true' is the label of inner's CE attack: set Config.inner=True")
        if self.loss != "ce" and (self.labels != "true" or self.reweight != "none" or self.iseat > 0):
            raise ValueError(f"Config.loss={self.loss!r} is {self.loss.upper()}'s own loss on the ground truth: it "
                             "needs labels='true', and takes no reweight or iseat")


def no_fp16(device):
    """The caller's autocast for passes whose gradient is only a direction (attack, AWP), never fp16 (its input
    gradient underflows on confident points: PGD stops); native bf16 instead, else float32."""
    if not (torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16):
        return contextlib.nullcontext()
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.autocast(device.type, dtype=torch.bfloat16) if native else torch.autocast(device.type, enabled=False)


def f32(logits):
    """Logits for the losses: autocast's bf16/fp16 ones in float32; float32 and float64 as they are."""
    return logits if logits.dtype == torch.float64 else logits.float()


def margin_loss(logits, y):
    """C&W margin loss -(z_y - max_{j != y} z_j) per example (the AT literature's CW-inf)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1) - z_y


def perturb(model, x, y, *, epsilon, step_size, num_steps, loss="ce", start="normal", norm="linf", fat_tau=-1,
            fat_omega=0.0):
    """The one attack, of training and evaluation: K signed-gradient ascent steps in the L-inf ball (norm "l2":
    steps along g / ||g||_2, then onto the L2 ball and the box), on loss "ce" CE(f(x'), y) (PGD-AT; Eq. 7 with
    y = y_dyn), "kl" KL(p(f(x)) || p(f(x'))) (TRADES/LBGAT) or "cw" (margin), from start "normal" x + 0.001
    N(0, I) (TRADES/LBGAT/DYNAT) or "uniform" in the ball (L2: a random direction at a radius U(0, eps), Rice et
    al.'s), projected like every iterate (eps = 0 or K = 0 give valid images). The model runs in eval mode, its
    parameters frozen; both restored. Returns (x_adv, kappa): kappa[i] counts the iterates, checked before
    each update, classified as y[i] (GAIRAT's geometry value; robust in an evaluation only if kappa = K).
    fat_tau >= 0: FAT's early-stopped PGD, a point stays at its (tau + 1)-th misclassified iterate, and every
    step adds fat_omega N(0, I)."""
    was_training, frozen = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    size = lambda z: z.flatten(1).norm(dim=1).view(-1, *[1] * (z.dim() - 1))  # per-example L2 norm
    if norm == "l2":  # the box after the ball: clamping moves a pixel towards x, never out of the ball
        project = lambda z: (x + (z - x) * (epsilon / (size(z - x) + 1e-12)).clamp(max=1)).clamp(0, 1)
    else:
        project = lambda z: torch.min(torch.max(z, x - epsilon), x + epsilon).clamp(0, 1)
    try:
        with no_fp16(x.device):
            if loss == "kl":
                with torch.no_grad():
                    p_nat = F.softmax(f32(model(x)), dim=1)
            if start == "uniform" and norm == "l2":
                noise = torch.randn_like(x)
                noise = noise / size(noise) * epsilon * torch.rand_like(size(noise))
            else:
                uniform = start == "uniform"
                noise = torch.empty_like(x).uniform_(-epsilon, epsilon) if uniform else 0.001 * torch.randn_like(x)
            x_adv, kappa = project(x + noise), torch.zeros(len(x), dtype=torch.long, device=x.device)
            active, budget = torch.ones_like(y, dtype=torch.bool), torch.full_like(y, fat_tau)
            for _ in range(num_steps):
                x_adv.requires_grad_(True)
                logits = f32(model(x_adv))
                correct = logits.argmax(1) == y
                kappa += correct.long()
                if fat_tau >= 0:  # FAT: wrong with no budget left, stop at this iterate; wrong with some, spend one
                    active, budget = active & (correct | (budget > 0)), budget - (active & ~correct).long()
                objective = {"ce": lambda: F.cross_entropy(logits, y, reduction="sum"),
                             "kl": lambda: F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum"),
                             "cw": lambda: margin_loss(logits, y).sum()}[loss]()
                grad, = torch.autograd.grad(objective, x_adv)
                step = step_size * (grad / (size(grad) + 1e-10) if norm == "l2" else grad.sign())
                if fat_tau >= 0:  # FAT's noise on every step; a point that stopped stays (project(z) is z)
                    step = torch.where(active[:, None, None, None], step + fat_omega * torch.randn_like(x), 0.0)
                x_adv = project(x_adv.detach() + step)
        return x_adv.detach(), kappa
    finally:
        model.train(was_training)
        for p, r in zip(model.parameters(), frozen):
            p.requires_grad_(r)


def dynat_loss(target, guide, x, y, cfg=Config()):
    """Algorithm 1 on one batch: returns (loss, stats) for one optimizer step of BOTH models.

    Pass both models in train mode (a model in eval mode is refused: BatchNorm would use its running statistics,
    another loss), x float B x C x H x W with pixels in [0, 1] (the attack's ball and box are in pixels: a
    normalisation belongs inside the model), y int64 B, and cfg a Config.
    Returns loss = L_g + beta L_t (Eq. 6) [+ alpha KL, ISEAT], a scalar to call backward() on, and stats, detached:
    loss_guide (L_g), loss_target (beta L_t [+ alpha KL]), dyn_correct (a count: how many of the B dynamic labels
    equal y) and, with cfg.iseat, loss_iseat.
    Step ONE optimizer over target.parameters() and guide.parameters() together: Eq. 6 minimises L_g + beta L_t
    jointly, and a guide left out of the optimizer never learns (its labels stay at chance, the target fits them).
    No hidden side effects: nothing is zeroed or stepped, the modes are kept, the target's weights never written
    (AWP runs w + delta functionally); only BatchNorm statistics move, as in any train-mode forward: the guide's on
    x, the target's on x' then x (cfg.clean_bn). Under torch.distributed every process must call it (AWP's
    all-reduce)."""
    if cfg.labels != "dynamic":
        raise ValueError(f"Config.labels={cfg.labels!r} is not DYNAT: call training_loss, which picks that method")
    require_train_mode(target=target, guide=guide)
    logits_guide = f32(guide(x))  # the guide runs once, on the clean batch
    y_dyn = logits_guide.detach().argmax(1)  # Eq. 3: the dynamic label, onehot(argmax f_g(x)); ties: the lowest index
    loss_guide = F.cross_entropy(logits_guide, y)  # Eq. 4: L_g, the guide learns y
    x_adv, kappa = attack(target, x, y if cfg.inner_label == "true" else y_dyn, cfg)  # Eq. 7 if cfg.inner, else KL

    def beta_loss_target(logits_adv, logits_nat):  # beta L_t (+ alpha KL), at the weights the target is run at
        ce = F.cross_entropy(logits_adv, y_dyn, reduction="none", label_smoothing=cfg.label_smoothing)  # Eq. 5: L_t
        ce = ce * instance_weights(cfg, kappa, logits_adv, y_dyn)  # GAIRAT's or MAIL's weights (Tables 3-4), else 1
        return cfg.beta * ce.mean() + tradeoff(cfg, logits_adv, logits_nat)

    loss_target, logits_adv = target_term(target, x, x_adv, cfg, beta_loss_target)  # at w + delta under cfg.awp
    loss = loss_guide + loss_target  # Eq. 6: L_g + beta L_t, one step of both models
    stats = dict(loss_guide=loss_guide.detach(), loss_target=loss_target.detach(), dyn_correct=(y_dyn == y).sum())
    return with_iseat(loss, stats, target, x, logits_adv, y_dyn, cfg)


# ---------------------------------------------------------------- what DYNAT shares with the comparison methods

def require_train_mode(**models):
    """The losses train what they are given: a model left in eval mode would compute another loss, in silence."""
    for name, model in models.items():
        if model is None or not model.training:
            raise ValueError(f"{name} is {'None' if model is None else 'in eval mode'}: pass a model in train mode "
                             f"({name}.train())")


def attack(target, x, label, cfg):
    """perturb with cfg's threat model: CE on `label` if cfg.inner (Eq. 7, PGD-AT's), else TRADES's KL attack."""
    return perturb(target, x, label, epsilon=cfg.epsilon, step_size=cfg.step_size, num_steps=cfg.num_steps,
                   loss="ce" if cfg.inner else "kl", start=cfg.start, norm=cfg.norm, fat_tau=cfg.fat_tau,
                   fat_omega=cfg.fat_omega)


def instance_weights(cfg, kappa, logits_adv, label):
    """Per-example weights of the target's loss, mean 1 in the batch: GAIRAT's from the attack's kappa,
    (1 + tanh(lambda + 5 (1 - 2 kappa / K))) / 2, or MAIL's from the margin on f_t(x'),
    sigmoid(slope (max_{j != label} p_j - p_label + bias)); 1 without cfg.reweight."""
    if cfg.reweight == "gairat":
        w = 0.5 * (1 + torch.tanh(cfg.gair_lambda + 5 * (1 - 2 * kappa.float() / max(cfg.num_steps, 1))))
    elif cfg.reweight == "mail":
        p = F.softmax(logits_adv.detach(), dim=1)
        p_label = p.gather(1, label[:, None]).squeeze(1)
        margin = p.masked_fill(F.one_hot(label, p.shape[1]).bool(), -1.0).amax(1) - p_label
        w = torch.sigmoid(cfg.mail_slope * (margin + cfg.mail_bias))
    else:
        return 1.0
    return w / w.mean()


def tradeoff(cfg, logits_adv, logits_nat):
    """TRADES's term alpha KL(p(f_t(x)) || p(f_t(x'))), batch mean, gradient through both (0 when alpha is 0)."""
    if cfg.alpha == 0:
        return 0.0
    return cfg.alpha * F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")


def target_term(target, x, x_adv, cfg, loss_fn, clean_first=False):
    """A method's loss on the target, loss_fn(logits_adv, logits_nat), at w + delta under cfg.awp; returns
    (loss, logits_adv). f_t(x) is run (logits_nat, else None) when clean_first (TRADES, MART: before f_t(x'), as
    their releases) or when alpha > 0; with cfg.clean_bn (the release's habit) a no-grad one follows f_t(x') where
    none ran. ISEAT's own f_t(x) (with_iseat) stands in for that one."""
    def at(forward, clean_bn):
        logits_nat = f32(forward(x)) if clean_first else None
        logits_adv = f32(forward(x_adv))
        if logits_nat is None and cfg.alpha > 0:
            logits_nat = f32(forward(x))
        if clean_bn and (clean_first or cfg.alpha == 0):
            with torch.no_grad():
                forward(x)
        return loss_fn(logits_adv, logits_nat), logits_adv

    forward = awp_forward(target, x, lambda model: at(model, clean_bn=False)[0], cfg) if cfg.awp else target
    return at(forward, clean_bn=cfg.clean_bn and cfg.iseat == 0)


def awp_forward(target, x, loss_at, cfg):
    """AWP (Wu et al. 2020): the target's forward at w + v, v_l = gamma ||w_l|| g_l / ||g_l|| per conv/linear
    weight, g the gradient of the method's own loss loss_at(target) at w: a proxy model's single SGD ascent step
    rescaled per layer (its learning rate cancels), without the proxy. Weights the forward never uses (the
    sub_block1 of the WideResNet that TRADES, MART, GAIRAT and the DYNAT release ship) get no gradient and stay
    as they are; BatchNorm statistics are left as they were, as a proxy's pass leaves the target's."""
    saved = [b.clone() for b in target.buffers()]
    try:
        with no_fp16(x.device):
            loss = loss_at(target)
        named = [(n, p) for n, p in target.named_parameters() if p.ndim > 1 and p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:  # after the backward: BatchNorm's backward reads the running statistics it saw
        for b, s in zip(target.buffers(), saved):
            b.copy_(s)
    named, grads = [pair for pair, g in zip(named, grads) if g is not None], [g for g in grads if g is not None]
    if grads and torch.distributed.is_available() and torch.distributed.is_initialized():
        flat = torch.cat([g.reshape(-1) for g in grads]) * len(x)  # each process's mean times its share of the batch
        torch.distributed.all_reduce(flat)  # the global batch's gradient, up to a scale v does not see
        grads = [c.view_as(g) for c, g in zip(flat.split([g.numel() for g in grads]), grads)]
    # nan_to_num: a layer whose gradient overflowed (fp16) is left unperturbed this step
    params = {n: p + torch.nan_to_num(cfg.awp_gamma * p.detach().norm() * g / (g.norm() + 1e-20), 0.0, 0.0, 0.0)
              for (n, p), g in zip(named, grads)}
    return (lambda inp: functional_call(target, params, (inp,))) if params else target


def with_iseat(loss, stats, target, x, logits_adv, label, cfg):
    """ISEAT (Li et al. 2023), with cfg.iseat > 0: adds lambda (1/B) sum_i w_i ||f_{w+v}(x'_i) - f_w(x_i)||^2, w_i = k/B
    for the example of the k-th smallest vulnerability CE(f(x'_i), label_i) - CE(f(x_i), label_i)."""
    if cfg.iseat == 0:
        return loss, stats
    logits_nat = f32(target(x))  # at w, train mode: the clean BatchNorm statistics of this step
    vulnerability = (F.cross_entropy(logits_adv, label, reduction="none")
                     - F.cross_entropy(logits_nat, label, reduction="none")).detach()
    rank_weights = (vulnerability.argsort().argsort() + 1).float() / len(x)  # k-th smallest gets k/B
    loss_iseat = cfg.iseat * (rank_weights * (logits_adv - logits_nat).pow(2).sum(1)).mean()
    return loss + loss_iseat, {**stats, "loss_iseat": loss_iseat.detach()}


# ---------------------------------------------------------------- the comparison methods, each as its release

def pgd_at_loss(target, x, y, cfg=Config(labels="true")):
    """PGD-AT (Madry et al. 2018, as Rice et al.'s release): beta CE(f_t(x'), y) on the attack's x'. Its rows'
    variants: cfg.awp (AT-AWP), cfg.reweight (GAIRAT, MAIL-AT), cfg.fat_tau >= 0 (FAT: the attack stops early),
    cfg.iseat (ISEAT). Returns (loss, stats) as dynat_loss, without a guide."""
    require_train_mode(target=target)
    x_adv, kappa = attack(target, x, y, cfg)

    def loss_fn(logits_adv, logits_nat):
        ce = F.cross_entropy(logits_adv, y, reduction="none", label_smoothing=cfg.label_smoothing)
        ce = ce * instance_weights(cfg, kappa, logits_adv, y)
        return cfg.beta * ce.mean() + tradeoff(cfg, logits_adv, logits_nat)

    loss, logits_adv = target_term(target, x, x_adv, cfg, loss_fn)
    return with_iseat(loss, dict(loss_target=loss.detach()), target, x, logits_adv, y, cfg)


def trades_loss(target, x, y, cfg=Config(labels="true", loss="trades", alpha=6.0)):
    """TRADES (Zhang et al. 2019, trades.py): beta CE(f_t(x), y) + alpha KL(p(f_t(x)) || p(f_t(x'))), x' from the
    KL attack (TRADES's beta is our alpha). cfg.awp: TRADES-AWP."""
    require_train_mode(target=target)
    x_adv, _ = attack(target, x, y, cfg)

    def loss_fn(logits_adv, logits_nat):
        ce = F.cross_entropy(logits_nat, y, reduction="none", label_smoothing=cfg.label_smoothing)
        return cfg.beta * ce.mean() + tradeoff(cfg, logits_adv, logits_nat)

    loss, _ = target_term(target, x, x_adv, cfg, loss_fn, clean_first=True)
    return loss, dict(loss_target=loss.detach())


def sat_loss(target, x, y, soft_labels, cfg=Config(labels="true", loss="trades", alpha=6.0)):
    """SAT (Huang et al. 2020) in its adversarial setting, TRADES with self-adaptive targets: TRADES's clean CE on
    soft targets t <- m t + (1 - m) p(f_t(x)) (soft_labels: the batch's rows, B x C), each example weighted by
    max_c t_c (normalised to sum B). stats["soft_labels"] holds the updated rows for the caller to keep."""
    require_train_mode(target=target)
    if cfg.awp:
        raise ValueError("Config.awp=True: SAT's adversarial setting has no AWP")
    x_adv, _ = attack(target, x, y, cfg)
    stats = {}

    def loss_fn(logits_adv, logits_nat):
        soft = cfg.sat_momentum * soft_labels + (1 - cfg.sat_momentum) * F.softmax(logits_nat.detach(), dim=1)
        stats["soft_labels"], w = soft, soft.amax(1)
        ce = F.cross_entropy(logits_nat, soft, reduction="none") * (w * len(w) / w.sum())
        return cfg.beta * ce.mean() + tradeoff(cfg, logits_adv, logits_nat)

    loss, _ = target_term(target, x, x_adv, cfg, loss_fn, clean_first=True)
    return loss, dict(stats, loss_target=loss.detach())


def mart_loss(target, x, y, cfg=Config(labels="true", loss="mart", alpha=6.0, inner=True, clean_bn=False)):
    """MART (Wang et al. 2020, its release's loss): beta [CE(f_t(x'), y) + BCE on the likeliest wrong class]
    + alpha KL(p(f_t(x)) || p(f_t(x'))) weighted by 1 - p_y(f_t(x)), with its release's epsilons. cfg.awp:
    MART-AWP."""
    require_train_mode(target=target)
    x_adv, _ = attack(target, x, y, cfg)

    def loss_fn(logits_adv, logits_nat):
        p_adv, p_nat = F.softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1)
        top2 = p_adv.argsort(dim=1)[:, -2:]
        y_wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # the likeliest wrong class
        bce = (F.cross_entropy(logits_adv, y, reduction="none")
               + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), y_wrong, reduction="none"))
        kl = F.kl_div(torch.log(F.softmax(logits_adv, dim=1) + 1e-12), p_nat, reduction="none").sum(1)
        return cfg.beta * bce.mean() + cfg.alpha * (kl * (1.0000001 - p_nat.gather(1, y[:, None]).squeeze(1))).mean()

    loss, _ = target_term(target, x, x_adv, cfg, loss_fn, clean_first=True)
    return loss, dict(loss_target=loss.detach())


def lbgat_loss(target, guide, x, y, cfg=Config(labels="lbgat")):
    """LBGAT (Cui et al. 2021): the guide (their natural model) learns CE(f_g(x), y) and the target's logits on x'
    regress the guide's, beta MSE(f_t(x'), f_g(x)), the gradient reaching both models; alpha: LBGAT + TRADES's KL
    (their CIFAR-100 model). The attack's CE label, MAIL's weights (Table 4's "MAIL (MSE)") and ISEAT's take the
    guide's argmax, as DYNAT's."""
    require_train_mode(target=target, guide=guide)
    logits_guide = f32(guide(x))
    loss_guide = F.cross_entropy(logits_guide, y)
    y_guide = logits_guide.detach().argmax(1)
    x_adv, kappa = attack(target, x, y if cfg.inner_label == "true" else y_guide, cfg)

    def loss_fn(logits_adv, logits_nat):
        mse = F.mse_loss(logits_adv, logits_guide, reduction="none").mean(1)
        mse = mse * instance_weights(cfg, kappa, logits_adv, y_guide)  # MAIL's weights: Table 4's "MAIL (MSE)"
        return cfg.beta * mse.mean() + tradeoff(cfg, logits_adv, logits_nat)

    loss_target, logits_adv = target_term(target, x, x_adv, cfg, loss_fn)
    stats = dict(loss_guide=loss_guide.detach(), loss_target=loss_target.detach(), dyn_correct=(y_guide == y).sum())
    return with_iseat(loss_guide + loss_target, stats, target, x, logits_adv, y_guide, cfg)


def training_loss(target, guide, x, y, cfg=Config(), soft_labels=None):
    """The method cfg names, as dynat.py trains it: DYNAT (labels "dynamic"), LBGAT ("lbgat"), or with labels "true"
    PGD-AT (loss "ce"), TRADES ("trades"; SAT when given soft_labels) or MART ("mart"). guide: None with "true"."""
    if cfg.labels == "dynamic":
        return dynat_loss(target, guide, x, y, cfg)
    if cfg.labels == "lbgat":
        return lbgat_loss(target, guide, x, y, cfg)
    if soft_labels is not None:
        return sat_loss(target, x, y, soft_labels, cfg)
    return {"ce": pgd_at_loss, "trades": trades_loss, "mart": mart_loss}[cfg.loss](target, x, y, cfg)
# ============================================================================== END DYNAT BLOCK


# ----------------------------------------------------------------------------- the training step


def learning_rate(args, epoch):
    """(the paper's epoch, its lr) of a run's `epoch`: --guide-warmup's come first (<= 0; 0.2 lr, then lr); then
    epoch 1 at --lr-warm-start x lr, and from each of --lr-milestones on its --lr-factors x lr (by default the
    release's: x0.1 after 75 %, x0.01 after 90 % of --epochs, from epochs 76 and 91 of 100)."""
    paper_epoch = epoch - args.guide_warmup
    if paper_epoch <= 0:
        return paper_epoch, (0.2 if epoch == 1 else 1.0) * args.lr
    milestones = args.lr_milestones or (int(0.75 * args.epochs) + 1, int(0.9 * args.epochs) + 1)
    passed = [f for m, f in zip(milestones, args.lr_factors or (0.1, 0.01)) if paper_epoch >= m]
    return paper_epoch, (args.lr_warm_start if paper_epoch == 1 else (passed or [1.0])[-1]) * args.lr


def train_step(target, guide, optimizer, scaler, x, y, cfg, *, amp=None, guide_only=False, share=1.0, world=1,
               sync_buffers=True, clip=None, stop_flags=(), soft_labels=None, batch=None, ema=None):
    """Eq. 6's joint minimisation: training_loss (--guide-warmup: Eq. 4 alone), backward, gradients averaged across
    processes, one SGD step of both models. Returns STEP_STATS (losses times this process's `share`) and the
    STOP_FLAGS summed over the processes, in one tensor on the device: the loop reads it once per step.
    soft_labels: SAT's targets of every training image (N x C), updated here at the global `batch`'s indices.
    ema: (model, decay): the average of the target's weights, moved towards them after the step."""
    rank = dist.get_rank() if world > 1 else 0
    rows = None if soft_labels is None else soft_labels[batch.tensor_split(world)[rank]]
    with autocast(x.device, amp):
        if guide_only:  # the target gets no gradient, weight decay or momentum
            logits_guide = f32(guide(x))
            loss = F.cross_entropy(logits_guide, y)
            stats = {"loss_guide": loss.detach(), "dyn_correct": (logits_guide.detach().argmax(1) == y).sum()}
        else:
            loss, stats = training_loss(target, guide, x, y, cfg, soft_labels=rows)
    if rows is not None:  # SAT: the global batch's new targets, the same on every process
        new = stats["soft_labels"]
        if world > 1:
            full = soft_labels.new_zeros(len(batch), new.shape[1])
            start = len(torch.cat(batch.tensor_split(world)[:rank]))
            full[start:start + len(new)] = new
            dist.all_reduce(full)
            new = full
        soft_labels[batch] = new
    optimizer.zero_grad(set_to_none=True)
    # unequal shares under torchrun: each process's mean weighted so that their average is the global batch's
    scaler.scale(loss * share).backward()
    if world > 1:
        average_replicas([m for m in (target, guide) if m is not None], world, buffers=sync_buffers)
    if clip is not None:  # --target-clip, on the averaged, unscaled gradient; the norm stays on the device
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(*clip)
    scaler.step(optimizer)
    scaler.update()
    if ema is not None:
        update_ema(ema[0], target, ema[1])
    zero = loss.new_zeros(())  # zero + flag: a fill on the device, not a copy that waits for it
    values = torch.stack([stats.get(k, zero).float() * (share if k.startswith("loss") else 1.0) for k in STEP_STATS]
                         + [zero + flag for flag in stop_flags])
    if world > 1:
        dist.all_reduce(values)  # statistics and stop flags of every process in one collective
    return values


# ----------------------------------------------------------------------------- evaluation

def pgd(**settings):
    """The attack of classify and robust_mask (dynat_runs): perturb(**settings), the block's one attack, with an
    image counted robust only if the model classified it right at every iterate (the start, each step, the end)."""
    def attack(model, x, y):
        x_adv, kappa = perturb(model, x, y, **settings)
        return x_adv, kappa == settings["num_steps"]  # correct at each iterate before the last
    return attack


def collapse_warning(row, classes, first_target_epoch, steps_per_epoch, guide_warmup=0):
    """One line when the target is dead (one class, from its 2nd epoch) or far behind its labels (clean
    accuracy < half their agreement with y, from its 3rd) while they beat chance twice over; else None."""
    dyn, acc, pred = row.get("dynamic_label_acc"), row.get("target_clean_acc"), row.get("target_pred_classes")
    if dyn is None or acc is None or classes < 2 or dyn < 2 / classes:
        return None
    if pred == 1 and row["epoch"] > first_target_epoch:
        state = f"is dead: it predicts one class for every test image (clean accuracy {acc:.3f})"
    elif row["epoch"] >= first_target_epoch + 2 and acc < 0.5 * dyn:
        state = f"is far behind its labels: clean accuracy {acc:.3f}, its dynamic labels agree with y {dyn:.3f}"
    else:
        return None
    warmup = max(math.ceil(80 / steps_per_epoch), 2 * guide_warmup)
    return (f"warning: epoch {row['epoch']}: the target {state}. Its first steps fit the guide's near-constant, "
            "class-hopping early labels, which pushes its last ReLUs to zero (docs/training-dynamics.md); "
            f"rerun with --guide-warmup {warmup} (about 80 steps of the guide alone first, at {steps_per_epoch} "
            f"steps per epoch{f'; this run had {guide_warmup}' if guide_warmup else ''}), or --target-clip 0.5")


def run_title(args):
    """The run in one line: data, models, and each setting that differs from the paper's, as its flag
    (epsilon and step as the paper writes them: 8/255); a second line says synthetic data means nothing."""
    cfg, paper, changed = config_of(args), Config(norm=args.norm), []
    for f in dataclasses.fields(Config):
        v, flag = getattr(cfg, f.name), f"--{f.name.replace('_', '-')}"
        if f.name == "fat_tau":  # the flag is a schedule
            changed += [f"{flag} {','.join(map(str, args.fat_tau))}"] * bool(args.fat_tau)
        elif v != getattr(paper, f.name):
            changed.append(flag if v is True else f"--no-{flag[2:]}" if v is False else f"{flag} {fmt_fraction(v)}"
                           if f.name in ("epsilon", "step_size") else f"{flag} {v:g}" if isinstance(v, float)
                           else f"{flag} {v}")
    return (f"{args.dataset}: {args.target} target" + f" / {args.guide} guide" * (args.labels != "true") + ", "
            + (" ".join(changed + [f"--guide-warmup {args.guide_warmup}"] * (args.guide_warmup > 0)) or "DYNAT")
            + "\nsynthetic data: random images and labels, the accuracies mean nothing" * (args.dataset == "synthetic"))


# ----------------------------------------------------------------------------- training

def build_models(args, classes, device, world, amp):
    """target, guide (None with --labels true), one SGD over both (Eq. 6), fp16's GradScaler and --ema's average
    of the target (evaluated only), from the run's seed: the same initial weights on every process."""
    torch.manual_seed(args.seed)
    target = models.build_model(args.target, classes).to(device)
    guide = models.build_model(args.guide, classes).to(device) if args.labels != "true" else None
    trained = [m for m in (target, guide) if m is not None]
    for m in trained:
        if args.sync_bn and world > 1:
            synchronise_batchnorm(m)
        m.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD([p for m in trained for p in m.parameters()], lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    ema = copy.deepcopy(target).requires_grad_(False) if args.ema else None
    if args.compile:  # after the weights are final: nn.Module.compile keeps the state_dict keys plain
        for m in trained:
            m.compile()
    return target, guide, optimizer, scaler, ema


def epoch_settings(args, flags, epoch, target):
    """(the paper's epoch, <= 0 during --guide-warmup; its lr; its Config, each variant switched on from its epoch;
    --target-clip's (parameters, norm) in the target's first epochs, else None)."""
    paper_epoch, lr = learning_rate(args, epoch)
    late = paper_epoch >= args.reweight_start  # the burn-in of the reweighting and ISEAT
    fat_tau = (args.fat_tau or (-1,))[sum(paper_epoch >= m for m in args.fat_tau_milestones)]
    cfg = dataclasses.replace(flags, awp=args.awp and paper_epoch >= args.awp_warmup, fat_tau=fat_tau,
                              reweight=args.reweight if late else "none", iseat=args.iseat if late else 0.0)
    clipped = args.target_clip > 0 and 1 <= paper_epoch <= args.target_clip_epochs
    return paper_epoch, lr, cfg, (list(target.parameters()), args.target_clip) if clipped else None


def start_notes(args, device):
    """What the start of a run says about its settings: a schedule that never reaches --lr; fp16 on a CPU."""
    first = args.guide_warmup + 1
    if max(learning_rate(args, e)[1] for e in range(first, first + args.epochs)) < args.lr:
        yield (f"note: with --epochs {args.epochs} the schedule never trains at the full --lr {args.lr:g} (0.2x in "
               "epoch 1, x0.1 after 75 % and x0.01 after 90 % of the epochs): a run this short learns little")
    if args.amp == "fp16" and device.type == "cpu":
        yield "note: --amp fp16 has no fast kernels on a CPU (tens of times slower than bf16): use --amp bf16 or none"


def train(args, ckpt=None):
    """--guide-warmup epochs of the guide alone, then --epochs of Algorithm 1; continues `ckpt` (last.pt) if given."""
    rank, world, device = init_processes(args.device)
    main_process, last_epoch = rank == 0, args.guide_warmup + args.epochs
    log = lambda *a: main_process and print(*a, flush=True)
    if ckpt is not None and ckpt["epoch"] >= last_epoch:
        log(f"{args.out_dir} already finished its {last_epoch} epoch{'s' * (last_epoch != 1)}: nothing to do")
        return 0
    if args.batch_size < world:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must be >= the {world} processes")
    last_path, best_path, jsonl_path = (os.path.join(args.out_dir, n) for n in ("last.pt", "best.pt", "metrics.jsonl"))
    check_out_dir(args.out_dir, resuming=ckpt is not None, fresh=not args.resume, overwrite=args.overwrite,
                  main_process=main_process)
    configure_backends(args.deterministic)
    amp = amp_dtype(args.amp, device)
    if args.amp == "auto":  # recorded as resolved: a resume on another machine keeps the run's precision
        args.amp = {None: "none", torch.bfloat16: "bf16"}[amp]
    fixed_shape = device.type == "cuda" or args.compile  # one evaluation shape where shapes cost: cuDNN, compile

    # data: uint8 N x 3 x H x W on the device, augmented there in every step
    sets = checked(data.load_data, args.dataset, args.data_dir, args.workers, args.train_size, args.val_size,
                   args.seed, rank, world)
    (images, labels), classes = (t.to(device) for t in sets["train"]), sets["classes"]
    target, guide, optimizer, scaler, ema = build_models(args, classes, device, world, amp)
    soft = F.one_hot(labels, classes).float() if args.sat else None  # SAT's targets of every training image
    start_epoch, best_val, ema_steps = 1, -1.0, 0
    new_sums = lambda: dict.fromkeys(STEP_STATS + ("seen", "step", "seconds"), 0.0)  # an epoch's sums, host floats
    sums = new_sums()
    if ckpt is not None:  # weights, optimizer, scaler, epoch, and mid-epoch the position and the sums
        for name, model in (("target", target), ("guide", guide), ("ema", ema)):
            if model is not None:
                load_weights(model, ckpt[name], f"{last_path} [{name}]", log)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        soft = None if soft is None else ckpt["sat_soft_labels"].to(device)
        start_epoch, best_val = ckpt["epoch"] + 1, ckpt["best_val"]
        ema_steps = ckpt["ema_steps"] if ema is not None else 0
        sums.update(ckpt["partial"] or {}, step=ckpt["step"])
        if ckpt.get("world", world) != world:  # allowed (the global batch is the same), but said
            log(f"note: resumed on {world} process(es), the run started on {ckpt['world']}: the attack's random starts "
                "(one seed per process) differ from an uninterrupted run's, and so does what each process computes "
                "over its share of the batch (GAIRAT/MAIL/ISEAT weights; BatchNorm's statistics unless --sync-bn)")
        log(f"resumed {args.out_dir} at epoch {start_epoch}, batch {int(sums['step'])}")
    if main_process:
        write_atomic(os.path.join(args.out_dir, "args.json"), lambda f: json.dump(vars(args), f, indent=1), "w")
    rows = metrics_before(jsonl_path, start_epoch) if main_process else []
    warned = any(r.get("warning") for r in rows)
    del ckpt  # the host copy of the weights and the optimizer state
    log(f"training {args.target} (target) with {args.guide if guide is not None else 'no'} guide on {args.dataset} "
        f"({len(labels)} train images, {classes} classes), {world} process(es) on {device}, amp={amp}, "
        f"channels_last={args.channels_last}" + "; synthetic data: random images and labels, every accuracy below "
        "means nothing" * (args.dataset == "synthetic"))
    for note in start_notes(args, device):
        log(note)
    prov, flags, title, host = provenance(), config_of(args), run_title(args), machine(device, world)
    weights = lambda: {"target": target.state_dict(), "guide": guide.state_dict() if guide is not None else None,
                       "ema": None if ema is None else ema.state_dict(), "classes": classes, "args": vars(args),
                       "provenance": prov}  # in every checkpoint

    def checkpoint(epoch_done, partial=None):  # last.pt: everything a resume needs (mid-epoch: `partial`)
        if main_process:
            save_checkpoint(last_path, {
                **weights(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch_done,
                "step": int(partial["step"]) if partial else 0, "partial": partial, "best_val": best_val,
                "world": world, "sat_soft_labels": soft, "ema_steps": ema_steps})

    with stop_signals() as received:
        for epoch in range(start_epoch, last_epoch + 1):
            paper_epoch, lr, cfg, clip = epoch_settings(args, flags, epoch, target)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = epoch_batches(len(labels), args.batch_size, args.seed, epoch, world, device,
                                    limit=1 if args.dry_run else None)
            bar = progress_bar(len(batches), f"epoch {epoch}", initial=int(sums["step"]), show=main_process,
                               mininterval=1.0)
            t0, signum = time.time(), None
            for step in range(int(sums["step"]), len(batches)):
                # every random draw of a step is a function of (seed, epoch, step): a resumed run continues exactly
                torch.manual_seed(step_seed(args.seed, epoch, step, 0))
                x, y = data.train_batch(images, labels, batches[step], device, args.channels_last, args.augment)
                share = 1.0
                if world > 1:  # the global batch augmented identically everywhere, then split; own attack seeds
                    x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
                    torch.manual_seed(step_seed(args.seed, epoch, step, rank))
                    share = len(y) * world / len(batches[step])
                averaged = ema is not None and paper_epoch > 0  # ramped up as TF's EMA: (1 + t) / (10 + t)
                values = train_step(target, guide, optimizer, scaler, x, y, cfg, amp=amp, guide_only=paper_epoch <= 0,
                                    share=share, world=world, sync_buffers=not args.sync_bn, clip=clip,
                                    stop_flags=[float(s in received) for s in STOP_SIGNALS] if world > 1 else (),
                                    soft_labels=soft if args.sat and paper_epoch >= args.sat_start else None,
                                    batch=batches[step],
                                    ema=(ema, min(args.ema, (1 + ema_steps) / (10 + ema_steps))) if averaged else None)
                ema_steps += averaged
                # the step's one host read, after the whole step is queued: the GPU works while the CPU waits here
                signum, values = add_step(sums, values, len(batches[step]), world,
                                          f"epoch {epoch}, batch {step + 1}; {last_path} holds the last good state")
                bar.update(1)
                bar.set_postfix(loss=f"{(values['loss_guide'] + values['loss_target']) / world:.3f}", refresh=False)
                # under torchrun every process stops at the batch where any process received a signal
                signum = signum or (received[0] if received and world == 1 else None)
                if signum:
                    break
            bar.close()
            sums["seconds"] += time.time() - t0
            if signum:
                checkpoint(epoch - 1, sums)
                log(f"interrupted by {signal.Signals(signum).name} at epoch {epoch}, batch {int(sums['step'])}: saved "
                    f"{last_path}; continue with: python dynat.py --resume {args.out_dir}")
                return 128 + signum

            row = epoch_row(epoch, lr, paper_epoch, sums, guide is not None, host) | (
                evaluate_epoch(dict(guide=guide, target=target, ema=ema), sets, args, epoch, device, amp, fixed_shape,
                               pgd)
                if main_process and (epoch % args.eval_every == 0 or epoch == last_epoch) else NOT_EVALUATED)
            # the target is judged once it trains unhindered: after the guide's warm-up and --target-clip's epochs
            first_free = args.guide_warmup + 1 + (args.target_clip_epochs if args.target_clip > 0 else 0)
            row["warning"] = None if warned else collapse_warning(
                row, classes, first_free, math.ceil(len(labels) / args.batch_size), args.guide_warmup)
            warned = warned or row["warning"] is not None
            val_pgd = row["target_pgd_acc"]
            improved = sets["val"] is not None and val_pgd is not None and val_pgd >= best_val
            best_val = val_pgd if improved else best_val
            if main_process:
                rows.append(row)
                with open(jsonl_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                plot_curves(rows, os.path.join(args.out_dir, "curves.png"), title)
                checkpoint(epoch)
                if improved:
                    save_checkpoint(best_path, weights() | dict(epoch=epoch, val_pgd_acc=val_pgd))
                log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in row.items() if v is not None and k not in ("warning", "machine")))
                if row["warning"]:
                    print(row["warning"], file=sys.stderr, flush=True)
            if world > 1:
                check_replicas([m for m in (target, guide, ema) if m is not None])
                dist.barrier()  # the others wait while rank 0 evaluates and writes
            sums = new_sums()
    return 0


def start(argv):
    """The run a command line asks for (a new one, or the one --resume names), trained in its out-dir, which is
    this run's while it lives (rank 0 writes; the others only read)."""
    args = get_parser().parse_args(argv)
    torchrun_notes(resume_auto=args.resume == "auto")
    if args.resume == "auto":
        validate_args(args)  # the radius and step filled in, as the run's args.json has them
    args, ckpt = resolve_resume(args, argv, get_parser)
    validate_args(args)
    with own_out_dir(args.out_dir, "dynat.py") if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        return train(args, ckpt)


def main(argv=None):
    if alone:
        print("dynat.py: error: training needs dynat_runs.py, models.py and data.py beside dynat.py", file=sys.stderr)
        return 2
    try:
        return exit_code("dynat.py", lambda: start(sys.argv[1:] if argv is None else argv),
                         interrupted="stopped at once by a second signal; last.pt holds the last saved state")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    sys.exit(code) if alone else exit_process(code)
