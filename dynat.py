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
Last measured result: none of the paper's rows (CIFAR, 100 epochs) has been run with this code yet.
On real images, on a CPU: DYNAT-Inner, 5,000 Fashion-MNIST images, WRN-16-2 / WRN-10-1, 4 epochs,
seed 0: 65.8 % clean, 59.6 % PGD-20 (docs/training-dynamics.md).

Reading order: arguments; THE ALGORITHM (a torch-only block to paste whole); the training program around it.
"""
import argparse
import contextlib
import copy
import dataclasses
import glob
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist


class UsageError(Exception):
    """Bad input: the scripts print the message on one line and exit with code 2."""


class Stopped(Exception):
    """A run cannot go on (a loss or a weight became inf/nan, a write failed): one line, exit 1; last.pt keeps the
    last good state."""


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once, exit 128 + signum."""


# ----------------------------------------------------------------------------- arguments

def fraction(text):
    """'8/255' or '0.031' as a float (argparse type of epsilon and step size)."""
    try:
        numerator, _, denominator = text.strip().partition("/")
        return float(numerator) / float(denominator or 1)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 8/255")


def number_list(kind):
    """argparse type of a comma list of `kind` ('76,91' or '0.1,0.01'), as a tuple."""
    def parse(text):
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of {kind.__name__} values")
    return parse


def fmt_fraction(v):
    """8/255 when v is a whole number of grey levels (how the paper writes it), else the decimal."""
    k = round(v * 255)
    return f"{k}/255" if k and abs(v * 255 - k) < 1e-9 else f"{v:g}"


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


def get_parser():
    """The flags, grouped: the headline command's first. Each setting of Config is its field as a flag (the
    field's default and comment); the rest are the training program's."""
    p = argparse.ArgumentParser(
        usage="python dynat.py [--dataset D] [--target A] [--guide A] [--epochs E] [--inner] [--awp] [--alpha A]\n"
              "                [--beta B] [--out-dir DIR] [--resume [DIR]] [options]   (all: --help)",
        description="DYNAT: dynamic-label adversarial training (Algorithm 1). Defaults are the paper's setting.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults, helps, added = {f.name: f.default for f in dataclasses.fields(Config)}, config_help(), []

    def field(group, name, **kw):  # Config's field `name` as --name, with its default and its comment
        default, flag = defaults[name], "--" + name.replace("_", "-")
        added.append(name)
        if isinstance(default, bool):
            kw.update(action=argparse.BooleanOptionalAction if default else "store_true")
        elif name in CHOICES:
            kw.update(choices=CHOICES[name])
        elif "type" not in kw:
            kw.update(type=type(default))
        group.add_argument(flag, default=default, help=kw.pop("help", helps[name]), **kw)

    g = p.add_argument_group("data, models and the headline command")
    g.add_argument("--dataset", default="cifar10", choices=sibling("data").DATASETS,
                   help="imagefolder: --data-dir DIR/{train,test}/<class>/*")
    g.add_argument("--data-dir", default="./data", help="where the dataset lives (CIFAR/MNIST downloaded when absent)")
    g.add_argument("--target", default="wrn-34-10", help="target model f_t: resnet18 or wrn-D-K (D = 6n+4)")
    g.add_argument("--guide", default="resnet18", help="guide model f_g (the same choices)")
    g.add_argument("--epochs", type=int, default=100, help="epochs of Algorithm 1")
    field(g, "inner")
    field(g, "awp")
    field(g, "alpha")
    field(g, "beta")
    g.add_argument("--out-dir", default="runs/dynat", help="where metrics, curves and checkpoints go")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="DIR",
                   help="alone (or 'auto'): continue the run in --out-dir if there is one (the same flags), else "
                   "start it, as evaluate.py's --resume; DIR: continue the run in DIR from DIR/last.pt%(default).0s")

    g = p.add_argument_group("DYNAT's other variants (the paper's Tables 2-4), and ours")
    for name in ("inner_label", "awp_gamma"):
        field(g, name)
    g.add_argument("--awp-warmup", type=int, default=10, help="first epoch with AWP")
    for name in ("reweight", "gair_lambda", "mail_bias", "mail_slope", "iseat"):
        field(g, name, **{"metavar": "LAMBDA"} if name == "iseat" else {})
    g.add_argument("--reweight-start", type=int, default=70, help="first epoch of --reweight and --iseat (burn-in)")
    for name in ("label_smoothing", "clean_bn"):
        field(g, name)
    g.add_argument("--ema", type=float, default=0.0, metavar="DECAY", help="an exponential moving average of the "
                   "target's weights, evaluated beside it (0: off, the paper)")
    g.add_argument("--guide-warmup", type=int, default=0, metavar="EPOCHS", help="guide-only epochs first (ours; "
                   "0: the paper; docs/training-dynamics.md)")
    g.add_argument("--target-clip", type=float, default=0.0, metavar="NORM", help="clip the target's gradient norm "
                   "in its first epochs (ours; 0: the paper)")
    g.add_argument("--target-clip-epochs", type=int, default=2, help="how many of the target's first epochs "
                   "--target-clip lasts")

    g = p.add_argument_group("the comparison methods (docs/reproducing.md)")
    for name in ("labels", "loss"):
        field(g, name)
    g.add_argument("--fat-tau", type=number_list(int), default=(), metavar="T,T",
                   help="FAT's early-stopped PGD: tau per --fat-tau-milestones (unset: off)%(default).0s")
    g.add_argument("--fat-tau-milestones", type=number_list(int), default=(), metavar="E,E",
                   help="epochs from which the next tau holds%(default).0s")
    added.append("fat_tau")  # Config holds one epoch's tau; the flag, the schedule
    field(g, "fat_omega")
    g.add_argument("--sat", action="store_true", help="SAT: self-adaptive soft targets for --loss trades")
    field(g, "sat_momentum")
    g.add_argument("--sat-start", type=int, default=70, help="first epoch of --sat")

    g = p.add_argument_group("threat model, data and schedule")
    field(g, "norm")
    # the radius and step depend on --norm: "%(default).0s" keeps argparse from appending "(default: None)"
    field(g, "epsilon", type=fraction, help="radius of the ball: 8/255 (L-inf; the paper writes 0.031), "
          "128/255 (L2)%(default).0s")
    field(g, "step_size", type=fraction, help="PGD step size: 2/255 (L-inf), 15/255 (L2)%(default).0s")
    for name in ("num_steps", "start"):
        field(g, name)
    g.add_argument("--batch-size", type=int, default=128, help="global batch size m (split across processes)")
    g.add_argument("--lr", type=float, default=0.1, help="learning rate")
    g.add_argument("--lr-milestones", type=number_list(int), default=None, metavar="E,E",
                   help="epochs from which the --lr-factors apply (unset: after 75%% and 90%% of --epochs)%(default).0s")
    g.add_argument("--lr-factors", type=number_list(float), default=None, metavar="F,F",
                   help="lr factor from each milestone (unset: 0.1,0.01)%(default).0s")
    g.add_argument("--lr-warm-start", type=float, default=0.2, help="lr factor of the first epoch (1: none)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=2e-4, help="SGD weight decay")
    g.add_argument("--train-size", type=int, default=0, help="class-balanced subset: the first N/C images of each "
                   "class (0: all)")
    g.add_argument("--val-size", type=int, default=0, help="training images held out to choose best.pt on (0: none)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random crop (4-pixel zero padding) and horizontal flip of every training batch (Sec. 4.1)")

    g = p.add_argument_group("precision, devices and processes")
    g.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, attack starts)")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (bitwise repeatable on a CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="autocast (auto: bf16 on Ampere+ GPUs)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile both models")
    g.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics of the global batch (torchrun)")
    g.add_argument("--workers", type=int, default=2, help="processes decoding an ImageFolder once at start-up")
    g.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out-dir")

    g = p.add_argument_group("evaluation during training")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and always at the last)")
    g.add_argument("--eval-pgd-n", type=int, default=1000, help="images of the per-epoch PGD-10 check")
    g.add_argument("--dry-run", action="store_true", help="one batch per epoch and one evaluation batch (smoke tests)")
    assert sorted(added) == sorted(f.name for f in dataclasses.fields(Config)), "a Config field without its flag"
    return p


def require(args, names, ok, what):
    """UsageError naming the flag unless ok(value) for each flag of `names` (None skips)."""
    for name in names:
        v = getattr(args, name)
        if v is not None and not ok(v):
            raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {v:g}")


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
        checked(sibling("models").check_arch, getattr(args, name), prefix=f"--{name}: ")
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

def amp_dtype(amp, device):
    """Autocast dtype of --amp (None: float32); auto is bf16 only on a GPU that runs it natively (Ampere+)."""
    if amp == "auto":
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device, dtype):
    """torch.autocast in `dtype` (None: float32): matmuls and convolutions only; BatchNorm stays float32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


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


def epoch_batches(n, batch_size, seed, epoch, world=1, device="cpu", limit=None):
    """The epoch's shuffled index batches, a pure function of (seed, epoch): a resume sees the same order.
    A last batch smaller than the world is dropped."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)
    batches = perm.split(batch_size)[:limit]
    return batches[:-1] if len(batches[-1]) < world else batches


def step_seed(seed, epoch, step, rank):
    """The seed of one step's randomness (augmentation, attack start): exact resume at any batch."""
    return (((seed * 100_003 + epoch) * 1_000_003 + step) * 1_009 + rank) % (2 ** 63)


def update_ema(average, model, decay):
    """--ema after a step: average's parameters <- decay * average + (1 - decay) * model's; its BatchNorm statistics
    are the model's own, copied, as the EMA of DM-Improves-AT and adversarial_robustness_pytorch does (update_bn)."""
    with torch.no_grad():
        for p_ema, p in zip(average.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - decay)
        for b_ema, b in zip(average.buffers(), model.buffers()):
            b_ema.copy_(b)


STEP_STATS = ("loss_guide", "loss_target", "loss_iseat", "dyn_correct")  # summed over an epoch's steps
STOP_SIGNALS, STOP_FLAGS = (signal.SIGINT, signal.SIGTERM), ("stop_sigint", "stop_sigterm")


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
        sibling("models").average_replicas([m for m in (target, guide) if m is not None], world, buffers=sync_buffers)
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

def classify(model, x, y, *, device, batch_size=256, attack=None, channels_last=False, fixed_shape=False,
             progress=None):
    """(predicted class, correct) per image of the uint8 images x, on the CPU, `model` in eval mode (then as
    it came), in the caller's autocast. Under perturb(**attack) a point is correct only if the model got it
    right at every iterate (the start, after each step, the end). fixed_shape pads the last chunk with
    copies of an image: one shape for every forward, so cuDNN autotunes once and compile never recompiles."""
    was_training, out = model.training, []
    model.eval()
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            n = len(yb)
            if fixed_shape and n < batch_size:
                xb = torch.cat([xb, xb[:1].expand(batch_size - n, *xb.shape[1:])])
                yb = torch.cat([yb, yb[:1].expand(batch_size - n)])
            xb, yb = sibling("data").to_input(xb, device, channels_last), yb.to(device)
            every = torch.ones_like(yb, dtype=torch.bool)
            if attack is not None:
                xb, kappa = perturb(model, xb, yb, **attack)
                every = kappa == attack["num_steps"]  # correct at each iterate before the last
            with torch.no_grad():
                pred = model(xb).argmax(1)
            out.append(torch.stack([pred, every & (pred == yb)])[:, :n].cpu())  # one copy per chunk
            if progress is not None:
                progress.update(n)
    finally:
        model.train(was_training)
    pred, correct = torch.cat(out, 1) if out else torch.zeros(2, 0, dtype=torch.long)
    return pred, correct.bool()


def robust_mask(model, x, y, attack, *, clean=None, restarts=1, progress=None, **common):
    """Per example: correct clean (`clean`: a mask) and at every iterate of `restarts` runs of perturb(**attack)."""
    robust = (classify(model, x, y, **common)[1] if clean is None else clean).clone()
    for _ in range(restarts):
        idx = robust.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        if progress is not None:
            progress.total += len(idx)
        robust[idx] = classify(model, x[idx], y[idx], attack=attack, progress=progress, **common)[1]
    return robust


def evaluate_epoch(models, data, args, epoch, device, amp, fixed_shape):
    """Per-epoch figures (rank 0, the run's precision): each model's clean test accuracy and how many classes
    it predicts (1 = dead); the target's (and its EMA's) PGD-10 on the validation split if any, else on
    --eval-pgd-n test images, in the run's threat model."""
    (x_test, y_test), val = data["test"], data["val"]
    limit = args.batch_size if args.dry_run else len(y_test)
    common = dict(device=device, batch_size=max(args.batch_size, 256), channels_last=args.channels_last,
                  fixed_shape=fixed_shape)
    row = {}
    with autocast(device, amp):
        for name, model in models.items():
            row[f"{name}_clean_acc"] = row[f"{name}_pred_classes"] = None
            if model is not None:
                pred, correct = classify(model, x_test[:limit], y_test[:limit], **common)
                row[f"{name}_clean_acc"] = correct.float().mean().item()
                row[f"{name}_pred_classes"] = len(pred.unique())
        x_pgd, y_pgd = val if val is not None else (x_test, y_test)
        n = min(args.eval_pgd_n, len(y_pgd), limit)
        pgd10 = dict(epsilon=args.epsilon, step_size=args.step_size, num_steps=10, loss="ce", start="uniform",
                     norm=args.norm)
        for name in ("target", "ema") if models.get("ema") is not None else ("target",):
            torch.manual_seed(step_seed(args.seed, epoch, 1_000_000, 0))  # the same starts, and after a resume
            robust = robust_mask(models[name], x_pgd[:n], y_pgd[:n], pgd10, **common)
            row[f"{name}_pgd_acc"] = robust.float().mean().item()
    return row | {"pgd_split": "val" if val is not None else "test", "pgd_n": n, "pgd_norm": args.norm}


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


# ----------------------------------------------------------------------------- files

def sibling(name):
    """models.py or data.py beside this file, by path: a research repo's own models/ or data/ would shadow them."""
    if f"dynat_{name}" not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"dynat_{name}", path)
        sys.modules[f"dynat_{name}"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[f"dynat_{name}"])
    return sys.modules[f"dynat_{name}"]


def checked(fn, *args, prefix=""):
    """fn(*args), a function of models.py or data.py, whose ValueError (a one-line reason) is a usage error here."""
    try:
        return fn(*args)
    except ValueError as e:
        raise UsageError(prefix + str(e))


def load_checkpoint(path):
    """models.load_checkpoint: torch.load(weights_only=True), nothing in the file ever executed; one-line errors."""
    return checked(sibling("models").load_checkpoint, path)


def load_weights(model, state_dict, source, log=print):
    """models.load_state, its notes logged and a mismatch one line naming `source`."""
    for note in checked(sibling("models").load_state, model, state_dict, prefix=f"{source}: "):
        log(f"{source}: {note}")


def save_checkpoint(path, ckpt):
    """ckpt sealed (on the CPU, its SHA-256 inside) and written atomically; one with inf or nan is never written."""
    try:
        sealed = sibling("models").seal(ckpt)
    except ValueError as e:
        kept = f"{path} keeps the last good state" if os.path.isfile(path) else f"no {os.path.basename(path)} yet"
        raise Stopped(f"{e}: not saved; {kept}") from None
    write_atomic(path, lambda f: torch.save(sealed, f))


def write_atomic(path, write, mode="wb"):
    """write(file) into a temp file, fsync, rename: a kill at any moment leaves the old file whole (own_out_dir
    removes a killed writer's temp file). A failed write (a full disk) is Stopped, the old file kept."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        for _ in range(4):  # the OSError torch.save wraps in a RuntimeError (a full disk); never an interrupt's
            if not isinstance(e, Exception) or isinstance(e, OSError):
                break
            e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        if isinstance(e, OSError):
            kept = "the previous one is kept" if os.path.exists(path) else "nothing was written"
            raise Stopped(f"{path}: {e.strerror or e} while writing it; {kept}") from None
        raise
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself, durable
    finally:
        os.close(fd)


LOCK = ".lock"  # in an out-dir: who holds it


@contextlib.contextmanager
def own_out_dir(path, who):
    """Create `path` and hold it for the `with`: a second run or evaluation into it is refused while this process
    lives (an flock, which the kernel drops when a process dies, so a dead run's lock never blocks). Holding it,
    temp files of dead writers (write_atomic's *.tmpPID) are removed. At the end the lock file goes, and so does
    the directory if this call created it and nothing was written there (a start that failed)."""
    created = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)  # a file there: FileExistsError
    except OSError as e:
        raise UsageError(f"{path}: cannot write there ({e.strerror})")
    lock = os.path.join(path, LOCK)
    fd, held = None, False
    try:
        for _ in range(10):  # the lock file a finishing holder unlinks is not this directory's lock: open it anew
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UsageError(f"{path}: cannot write there ({e.strerror})")
            try:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # no fcntl (Windows): unguarded
                break
            except BlockingIOError:
                holder = os.read(fd, 300).decode(errors="replace").strip()
                raise UsageError(f"{path} is in use by a live process ({holder}): wait for it or choose another "
                                 "directory")
            except OSError as e:  # a filesystem without locks
                print(f"note: {path}: no file locks here ({e.strerror}): a second run into it would not be refused",
                      file=sys.stderr)
                break
            if os.path.exists(lock) and os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
            os.close(fd)
            fd = None
        else:
            raise UsageError(f"{path}: its lock file keeps being replaced: another process is starting there")
        held = True
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {who}\n".encode())
        for tmp in glob.glob(os.path.join(glob.escape(path), "*.tmp[0-9]*")):
            os.remove(tmp)
        yield path
    finally:
        if held:
            with contextlib.suppress(OSError):
                os.remove(lock)  # while still held: a process that opened it meanwhile sees the unlink, opens anew
        if fd is not None:
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only if empty: nothing was written


def provenance():
    """The commit (+dirty for uncommitted changes) and library versions a result was made with."""
    git = lambda *a: subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), *a], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
    try:
        commit, dirty = git("rev-parse", "--short", "HEAD") or None, git("status", "--porcelain", "-uno")
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, ""
    return {"commit": commit and commit + "+dirty" * bool(dirty), "torch": str(torch.__version__),
            "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- processes

def init_processes(device_arg):
    """(rank, world, device): one process, or torchrun's world with NCCL on CUDA and gloo on a CPU."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    name = ("cuda" if torch.cuda.is_available() else "cpu") if device_arg == "auto" else device_arg
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {device_arg!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device_arg}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and world > 1:
        raise UsageError(f"--device {device_arg}: under torchrun each process takes cuda:LOCAL_RANK: pass cuda")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device()
        device = torch.device("cuda", local) if device.index is None else device
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def configure_backends(deterministic):
    """--deterministic: deterministic kernels (bitwise repeatable on a CPU); else cuDNN autotunes (fixed shapes).
    float32 means float32: no TF32 (torch's default runs cuDNN convolutions in TF32 on Ampere and newer)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


@contextlib.contextmanager
def stop_signals():
    """SIGINT/SIGTERM: save last.pt and stop at the next batch boundary (the yielded list holds the signal);
    a second one stops at once (StopNow). The old handlers come back on exit."""
    received = []

    def handle(signum, frame):
        if received:
            raise StopNow(signum)
        received.append(signum)
    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- resume

RESUME_KEYS = {"target", "guide", "optimizer", "scaler", "epoch", "step", "partial", "best_val", "args"}
RESUME_ALWAYS = ("resume", "out_dir", "overwrite")  # taken from a resume's command line; the rest from the run
RESUME_MAY_CHANGE = RESUME_ALWAYS + ("device", "workers", "data_dir", "eval_every", "eval_pgd_n", "compile",
                                     "deterministic")
RESUME_REASONS = {  # why a flag may not change on --resume; the rest would train another method than it began
    "epochs": "the lr milestones sit at 75 % and 90 % of --epochs, so another value re-times epochs already trained",
    "seed": "the remaining steps' data order, augmentation and attack starts are drawn from it",
    "batch_size": "the position saved in last.pt is a batch of the order drawn for that size",
    **dict.fromkeys(("dataset", "train_size", "val_size"), "the position saved in last.pt indexes that training set"),
    **dict.fromkeys(("target", "guide"), "last.pt holds weights of that architecture"),
    "guide_warmup": "the epochs of the lr schedule and of the variants' switches are counted after it"}


def resolve_resume(args, argv, auto=False):
    """--resume DIR: (the arguments the run was started with, DIR/last.pt's contents or None). Flags written
    in `argv` that would change the run are refused, one reason each. auto (--resume auto): DIR is --out-dir and
    every flag counts as written: the command must be the run's own."""
    run_dir, defaults, parser = args.out_dir if auto else args.resume, vars(get_parser().parse_args([])), get_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = set(defaults) if auto else set(vars(parser.parse_args(argv)))  # the flags written, not their defaults
    last, saved = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "args.json")
    if not os.path.isdir(run_dir):
        raise UsageError(f"--resume {run_dir}: {'not a' if os.path.exists(run_dir) else 'no such'} directory")
    ckpt = None
    if os.path.isfile(last):
        ckpt = load_checkpoint(last)
        missing = RESUME_KEYS - set(ckpt) if isinstance(ckpt, dict) else RESUME_KEYS
        if missing:
            raise UsageError(f"{last}: not a dynat.py training checkpoint (no {', '.join(sorted(missing))})")
        stored = ckpt["args"]
    elif os.path.isfile(saved):  # interrupted before the first checkpoint: start it again
        with open(saved) as f:
            stored = json.load(f)
    else:
        raise UsageError(f"--resume {run_dir}: neither last.pt nor args.json there; nothing to resume")
    old = lambda name: stored.get(name, defaults.get(name))
    conflicts = [f"--{name.replace('_', '-')} {getattr(args, name)} (the run has {old(name)}: " + RESUME_REASONS.get(
        name, "the rest of the run would train another method than its first part did") + ")"
                 for name in sorted(set(given) - set(RESUME_MAY_CHANGE)) if getattr(args, name) != old(name)
                 and not (name == "amp" and args.amp == "auto")]  # the run's resolved precision is kept
    if conflicts:
        raise UsageError(f"--resume {'auto: --out-dir ' * auto}{run_dir} continues the run with the flags it was "
                         f"started with; refused: {'; '.join(conflicts)}")
    args.out_dir = run_dir
    resumed = argparse.Namespace(**{**defaults, **stored})
    for key in RESUME_MAY_CHANGE:
        if key in RESUME_ALWAYS or key in given:
            setattr(resumed, key, getattr(args, key))
    return resumed, ckpt


# ----------------------------------------------------------------------------- curves

CURVES = {"dynamic_label_acc": (0, "dynamic labels = y (train)"), "guide_clean_acc": (0, "guide, clean (test)"),
          "target_clean_acc": (0, "target, clean (test)"), "target_pgd_acc": (0, "target, PGD-10"),
          "ema_clean_acc": (0, "target's EMA, clean (test)"), "ema_pgd_acc": (0, "target's EMA, PGD-10"),
          "loss_guide": (1, "guide loss L_g"), "loss_target": (1, "target loss")}  # metric: (panel, label)


def run_title(args):
    """The run in one line: data, models, and each setting that differs from the paper's, as its flag
    (epsilon and step as the paper writes them: 8/255)."""
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
            + (" ".join(changed + [f"--guide-warmup {args.guide_warmup}"] * (args.guide_warmup > 0)) or "DYNAT"))


def plot_curves(rows, path, args):
    """curves.png: accuracies, losses and lr per epoch; epoch e spans (e - 1, e], its figures drawn at e."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (acc, loss) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=[3, 2], layout="constrained")
    for key, (panel, label) in CURVES.items():
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            split = f" ({rows[-1]['pgd_split']}, {rows[-1]['pgd_norm']})" * key.endswith("pgd_acc")
            (acc, loss)[panel].plot(*zip(*pts), marker="o" if panel == 0 else ".", label=label + split)
    for ax, r in ((ax, r) for r in rows if r.get("warning") for ax in (acc, loss)):
        ax.axvline(r["epoch"], color="red", linestyle="--", label="collapse warning" if ax is acc else "_nolegend_")
    title = run_title(args)
    acc.set_title(title + "\nsynthetic data: random images and labels, the accuracies mean nothing"
                  * (args.dataset == "synthetic"), fontsize=9, wrap=True)
    acc.set(ylabel="accuracy", ylim=(0, 1))
    loss.set(ylabel="training loss (epoch mean)", xlabel="epoch")
    lr = loss.twinx()
    lr.stairs([r["lr"] for r in rows], [rows[0]["epoch"] - 1] + [r["epoch"] for r in rows], baseline=None,
              color="grey", label="learning rate")
    lr.set(ylabel="learning rate", ylim=(0, None))
    acc.grid(alpha=0.3), loss.grid(alpha=0.3)
    for ax, extra in ((acc, ()), (loss, lr.get_legend_handles_labels())):  # a legend per panel, beside it
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles + list(extra[0] if extra else []), labels + list(extra[1] if extra else []),
                  loc="upper left", bbox_to_anchor=(1.12 if ax is loss else 1.01, 1), fontsize=8)
    loss.xaxis.get_major_locator().set_params(integer=True)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------- training

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
    if ckpt is not None and main_process:  # room for the next checkpoint before an epoch is spent on it
        need = sum(os.path.getsize(p) for p in (last_path, best_path) if os.path.isfile(p))
        free = shutil.disk_usage(args.out_dir).free
        if free < need:
            raise Stopped(f"{args.out_dir}: {free / 2**20:.0f} MiB free, the next checkpoints need {need / 2**20:.0f} "
                          "MiB (last.pt's and best.pt's size): free some space, then resume")
    if not args.resume and os.path.isdir(args.out_dir) and set(os.listdir(args.out_dir)) - {LOCK}:
        if not args.overwrite:
            raise UsageError(f"--out-dir {args.out_dir} is not empty: pass --resume {args.out_dir} or --overwrite")
        for path in (last_path, best_path) if main_process else ():  # a stale best.pt must not pass for this run's
            if os.path.isfile(path):
                os.remove(path)
    configure_backends(args.deterministic)
    amp = amp_dtype(args.amp, device)
    if args.amp == "auto":  # recorded as resolved: a resume on another machine keeps the run's precision
        args.amp = {None: "none", torch.bfloat16: "bf16"}[amp]
    fixed_shape = device.type == "cuda" or args.compile  # one evaluation shape where shapes cost: cuDNN, compile

    # data: uint8 N x 3 x H x W on the device, augmented there in every step
    data = checked(sibling("data").load_data, args.dataset, args.data_dir, args.workers, args.train_size,
                   args.val_size, args.seed, rank, world)
    (images, labels), classes = (t.to(device) for t in data["train"]), data["classes"]

    # models: target, guide (none with --labels true), one SGD over both (Eq. 6), fp16's GradScaler
    torch.manual_seed(args.seed)  # the same initial weights on every process
    build = sibling("models").build_model
    target = build(args.target, classes).to(device)
    guide = build(args.guide, classes).to(device) if args.labels != "true" else None
    models = [m for m in (target, guide) if m is not None]
    for m in models:
        if args.sync_bn and world > 1:
            sibling("models").synchronise_batchnorm(m)
        m.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD([p for m in models for p in m.parameters()], lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    soft = F.one_hot(labels, classes).float() if args.sat else None  # SAT's targets of every training image
    ema, ema_steps = (copy.deepcopy(target).requires_grad_(False) if args.ema else None), 0  # --ema: evaluated only
    if args.compile:  # after the weights are final: nn.Module.compile keeps the state_dict keys plain
        for m in models:
            m.compile()

    start_epoch, best_val = 1, -1.0
    new_sums = lambda: dict.fromkeys(STEP_STATS + ("seen", "step", "seconds"), 0.0)  # an epoch's sums, host floats
    sums = new_sums()
    if ckpt is not None:  # weights, optimizer, scaler, epoch, and mid-epoch the position and the sums
        for name, model in (("target", target), ("guide", guide)) if guide is not None else (("target", target),):
            load_weights(model, ckpt[name], f"{last_path} [{name}]", log)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        soft = None if soft is None else ckpt["sat_soft_labels"].to(device)
        if ema is not None:
            load_weights(ema, ckpt["ema"], f"{last_path} [ema]", log)
            ema_steps = ckpt["ema_steps"]
        start_epoch, best_val = ckpt["epoch"] + 1, ckpt["best_val"]
        sums.update(ckpt["partial"] or {}, step=ckpt["step"])
        if ckpt.get("world", world) != world:  # allowed (the global batch is the same), but said
            log(f"note: resumed on {world} process(es), the run started on {ckpt['world']}: the attack's random starts "
                "(one seed per process) differ from an uninterrupted run's, and so does what each process computes "
                "over its share of the batch (GAIRAT/MAIL/ISEAT weights; BatchNorm's statistics unless --sync-bn)")
        log(f"resumed {args.out_dir} at epoch {start_epoch}, batch {int(sums['step'])}")
    rows = []
    if main_process:  # args.json, and metrics.jsonl cut back to the epochs before the one we start at
        write_atomic(os.path.join(args.out_dir, "args.json"), lambda f: json.dump(vars(args), f, indent=1), "w")
        if os.path.isfile(jsonl_path):
            with open(jsonl_path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line torn by a kill or a full disk: the last one
                        break
                    rows += [row] * (row["epoch"] < start_epoch)
        with open(jsonl_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    warned = any(r.get("warning") for r in rows)
    del ckpt  # the host copy of the weights and the optimizer state
    log(f"training {args.target} (target) with {args.guide if guide is not None else 'no'} guide on {args.dataset} "
        f"({len(labels)} train images, {classes} classes), {world} process(es) on {device}, amp={amp}, "
        f"channels_last={args.channels_last}" + "; synthetic data: random images and labels, every accuracy below "
        "means nothing" * (args.dataset == "synthetic"))
    if max(learning_rate(args, e)[1] for e in range(args.guide_warmup + 1, last_epoch + 1)) < args.lr:
        log(f"note: with --epochs {args.epochs} the schedule never trains at the full --lr {args.lr:g} (0.2x in "
            "epoch 1, x0.1 after 75 % and x0.01 after 90 % of the epochs): a run this short learns little")
    if args.amp == "fp16" and device.type == "cpu":
        log("note: --amp fp16 has no fast kernels on a CPU (tens of times slower than bf16): use --amp bf16 or none")
    prov, flags = provenance(), config_of(args)
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
            paper_epoch, lr = learning_rate(args, epoch)  # paper_epoch <= 0 during --guide-warmup
            for group in optimizer.param_groups:
                group["lr"] = lr
            late = paper_epoch >= args.reweight_start  # the burn-in of the reweighting and ISEAT
            fat_tau = (args.fat_tau or (-1,))[sum(paper_epoch >= m for m in args.fat_tau_milestones)]
            cfg = dataclasses.replace(flags, awp=args.awp and paper_epoch >= args.awp_warmup, fat_tau=fat_tau,
                                      reweight=args.reweight if late else "none", iseat=args.iseat if late else 0.0)
            clipped = args.target_clip > 0 and 1 <= paper_epoch <= args.target_clip_epochs  # the target's first epochs
            clip = (list(target.parameters()), args.target_clip) if clipped else None
            batches = epoch_batches(len(labels), args.batch_size, args.seed, epoch, world, device,
                                    limit=1 if args.dry_run else None)
            from tqdm import tqdm  # a bar on an interactive terminal only: a redirected log gets a line per epoch
            bar = tqdm(total=len(batches), initial=int(sums["step"]), desc=f"epoch {epoch}", leave=False,
                       mininterval=1.0, dynamic_ncols=True, disable=not (main_process and sys.stderr.isatty()))
            t0, signum = time.time(), None
            for step in range(int(sums["step"]), len(batches)):
                # every random draw of a step is a function of (seed, epoch, step): a resumed run continues exactly
                torch.manual_seed(step_seed(args.seed, epoch, step, 0))
                decay = min(args.ema, (1 + ema_steps) / (10 + ema_steps))  # ramped up as TF's EMA: (1 + t) / (10 + t)
                x, y = sibling("data").train_batch(images, labels, batches[step], device, args.channels_last,
                                                   args.augment)
                share = 1.0
                if world > 1:  # the global batch augmented identically everywhere, then split; own attack seeds
                    x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
                    torch.manual_seed(step_seed(args.seed, epoch, step, rank))
                    share = len(y) * world / len(batches[step])
                values = train_step(target, guide, optimizer, scaler, x, y, cfg, amp=amp, guide_only=paper_epoch <= 0,
                                    share=share, world=world, sync_buffers=not args.sync_bn, clip=clip,
                                    stop_flags=[float(s in received) for s in STOP_SIGNALS] if world > 1 else (),
                                    soft_labels=soft if args.sat and paper_epoch >= args.sat_start else None,
                                    batch=batches[step], ema=(ema, decay) if ema is not None and paper_epoch > 0 else None)
                ema_steps += ema is not None and paper_epoch > 0
                # the step's one host read, after the whole step is queued: the GPU works while the CPU waits here
                values = dict(zip(STEP_STATS + STOP_FLAGS, values.tolist()))
                for name in STEP_STATS:  # stop before anything is saved: last.pt stays the last good state
                    if not math.isfinite(values[name]):
                        raise Stopped(f"{name} is {values[name]} at epoch {epoch}, batch {step + 1}; "
                                      f"{last_path} holds the last good state")
                    sums[name] += values[name] / world if name.startswith("loss") else values[name]
                sums["seen"] += len(batches[step])
                sums["step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{(values['loss_guide'] + values['loss_target']) / world:.3f}", refresh=False)
                # under torchrun every process stops at the batch where any process received a signal
                signum = next((s for s, f in zip(STOP_SIGNALS, STOP_FLAGS) if values.get(f, 0) > 0),
                              received[0] if received and world == 1 else None)
                if signum:
                    break
            bar.close()
            sums["seconds"] += time.time() - t0
            if signum:
                checkpoint(epoch - 1, sums)
                log(f"interrupted by {signal.Signals(signum).name} at epoch {epoch}, batch {int(sums['step'])}: saved "
                    f"{last_path}; continue with: python dynat.py --resume {args.out_dir}")
                return 128 + signum

            # the epoch's metrics row: training sums, evaluation on rank 0, a collapse warning at most once per run
            n_steps = max(sums["step"], 1)
            row = {"epoch": epoch, "lr": lr, "seconds": round(sums["seconds"], 3), "target_trained": paper_epoch > 0,
                   "loss_guide": sums["loss_guide"] / n_steps if guide is not None else None,
                   "loss_target": sums["loss_target"] / n_steps if paper_epoch > 0 else None,
                   "dynamic_label_acc": sums["dyn_correct"] / sums["seen"] if guide is not None else None}
            if main_process and (epoch % args.eval_every == 0 or epoch == last_epoch):
                row.update(evaluate_epoch(dict(guide=guide, target=target, ema=ema), data, args, epoch, device, amp,
                                          fixed_shape))
            else:
                row.update(dict.fromkeys(f"{m}_{k}" for m in ("guide", "target", "ema") for k in ("clean_acc",
                                                                                                  "pred_classes")))
                row.update(dict.fromkeys(("target_pgd_acc", "ema_pgd_acc", "pgd_split", "pgd_n", "pgd_norm")))
            # the target is judged once it trains unhindered: after the guide's warm-up and --target-clip's epochs
            first_free = args.guide_warmup + 1 + (args.target_clip_epochs if args.target_clip > 0 else 0)
            row["warning"] = None if warned else collapse_warning(
                row, classes, first_free, math.ceil(len(labels) / args.batch_size), args.guide_warmup)
            warned = warned or row["warning"] is not None
            pgd = row["target_pgd_acc"]
            improved = data["val"] is not None and pgd is not None and pgd >= best_val
            best_val = pgd if improved else best_val
            if main_process:
                rows.append(row)
                with open(jsonl_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                plot_curves(rows, os.path.join(args.out_dir, "curves.png"), args)
                checkpoint(epoch)
                if improved:
                    save_checkpoint(best_path, weights() | dict(epoch=epoch, val_pgd_acc=pgd))
                log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in row.items() if v is not None and k != "warning"))
                if row["warning"]:
                    print(row["warning"], file=sys.stderr, flush=True)
            if world > 1:
                sibling("models").check_replicas(models + [ema] * (ema is not None))
                dist.barrier()  # the others wait while rank 0 evaluates and writes
            sums = new_sums()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = get_parser().parse_args(argv)
        ckpt = None
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and int(os.environ.get("RANK", "0")) == 0:
            advice = ["pass --resume, or a restart will refuse its non-empty --out-dir"] * (args.resume != "auto")
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # seen failing with torch 2.14.1
                advice.append("start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, or a restart may fail to "
                              "connect on stale addresses in torchrun's shared store (pytorch/pytorch#135712)")
            for a in advice:
                print(f"note: torchrun --max-restarts: {a}", file=sys.stderr, flush=True)
        if args.resume == "auto":  # the run in --out-dir if there is one, else a new one: a relaunch continues it
            validate_args(args)  # the radius and step filled in, as the run's args.json has them
            if any(os.path.isfile(os.path.join(args.out_dir, n)) for n in ("last.pt", "args.json")):
                args, ckpt = resolve_resume(args, argv, auto=True)
            else:  # a new run: an out-dir holding anything else is refused as without --resume
                args.resume = None
        elif args.resume:
            args, ckpt = resolve_resume(args, argv)
        validate_args(args)
        # the out-dir is this run's while it lives (rank 0 writes; the others only read)
        with own_out_dir(args.out_dir, "dynat.py") if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
            return train(args, ckpt)
    except UsageError as e:
        print(f"dynat.py: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"dynat.py: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a second signal (StopNow), or Ctrl-C before the loop's handlers
        print("dynat.py: stopped at once by a second signal; last.pt holds the last saved state", file=sys.stderr)
        return 128 + (e.args[0] if isinstance(e, StopNow) else signal.SIGINT)
    except OSError as e:  # a file that cannot be read or written (data, out-dir): one line, never a traceback
        print(f"dynat.py: error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
