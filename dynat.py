"""DYNAT: dynamic-label adversarial training (Liu et al.), reference implementation.

Algorithm 1, one iteration on a clean batch (x, y) in [0, 1] pixels:
  1. Guide forward once, train mode: z_g = f_g(x); L_g = CE(z_g, y)                    (Eq. 4)
  2. Dynamic label y_dyn = argmax z_g, no gradient                                    (Eq. 3)
  3. Inner maximisation on the frozen target, eval mode, K steps of signed PGD in the
     eps-ball: CE(f_t(x'), y_dyn) with --inner (Eq. 7), else the TRADES/LBGAT attack
     KL(p(f_t(x)) || p(f_t(x')))                                                       (Sec. 3.4)
  4. Target loss on x', train mode: L_t = CE(f_t(x'), y_dyn)                           (Eq. 5)
     [+ alpha * KL(p(f_t(x)) || p(f_t(x'))), + AWP on the target's weights,
      + GAIRAT / MAIL instance weights, + ISEAT smoothing term]
  5. One SGD step of both models on L_g + beta * L_t                                   (Eq. 6)

Headline row (Table 2, CIFAR-100, DYNAT-Inner-AWP alpha=1, beta=0.2):
  python dynat.py --dataset cifar100 --inner --awp --alpha 1 --beta 0.2
Last measured result: none of the paper's rows (CIFAR, 100 epochs) has been run with this code yet.
On real images, on a CPU: DYNAT-Inner, 5,000 Fashion-MNIST images, WRN-16-2 / WRN-10-1, 4 epochs,
seed 0: 65.8 % clean, 59.6 % PGD-20 (README, "A real run on a CPU" and "Training dynamics").
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from models import ARCH_HELP, build_model, check_arch, remap_state_dict


class UsageError(Exception):
    """Bad input: the scripts print the message on one line and exit with code 2."""


class NonFiniteLoss(Exception):
    """A loss term became inf/nan: the run stops, the last good checkpoint stays."""


# ----------------------------------------------------------------------------- args

def fraction(text):
    """Parse '8/255' or '0.031' as a float (argparse type for epsilon and step size)."""
    try:
        numerator, _, denominator = text.strip().partition("/")
        return float(numerator) / float(denominator or 1)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 8/255")


def get_parser():
    p = argparse.ArgumentParser(description="DYNAT: dynamic-label adversarial training (Algorithm 1).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data and models
    a("--dataset", default="cifar10", choices=DATASETS,
      help="training data; mnist/fashion-mnist are 28x28 grey images used as 3 channels; imagefolder reads "
           "DATA_DIR/train/<class>/* and DATA_DIR/test/<class>/*")
    a("--data-dir", default="./data", help="where the dataset lives (CIFAR/MNIST are downloaded there when absent)")
    a("--train-size", type=int, default=0,
      help="train on a class-balanced subset: the first N/C training images of each of the C classes (0: all)")
    a("--target", default="wrn-34-10", help=f"target model f_t: {ARCH_HELP}")
    a("--guide", default="resnet18", help="guide model f_g (same choices as --target)")
    a("--val-size", type=int, default=0,
      help="training images held out for validation; best.pt is chosen on them (0: no best.pt)")
    # optimisation (Sec. 4.1)
    a("--epochs", type=int, default=100, help="training epochs")
    a("--batch-size", type=int, default=128, help="global batch size m (split across processes)")
    a("--lr", type=float, default=0.1, help="learning rate (0.2x in epoch 1; x0.1 after 75%%, x0.01 after 90%% of epochs)")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight-decay", type=float, default=2e-4, help="SGD weight decay")
    # inner maximisation (Sec. 3.4, Eq. 7)
    a("--epsilon", type=fraction, default=8 / 255, help="L-inf radius epsilon of the attack (8/255 or 0.031)")
    a("--step-size", type=fraction, default=2 / 255, help="PGD step size (2/255)")
    a("--num-steps", type=int, default=10, help="PGD steps K of the training attack")
    a("--inner", action="store_true", help="DYNAT inner maximisation: CE(f_t(x'), y_dyn) (Eq. 7) instead of the KL attack")
    # loss (Eq. 5-6) and variants
    a("--alpha", type=float, default=0.0, help="TRADES weight alpha of KL(p(f_t(x)) || p(f_t(x')))")
    a("--beta", type=float, default=1.0, help="beta of Eq. 6, weight of the target loss L_t")
    a("--labels", default="dynamic", choices=["dynamic", "true", "lbgat"],
      help="target's labels: dynamic (DYNAT, Eq. 3), true (static-label baseline, no guide), lbgat (MSE to f_g(x))")
    a("--label-smoothing", type=float, default=0.0, help="label smoothing of the target's CE term")
    a("--awp", action="store_true", help="adversarial weight perturbation on the target (Wu et al. 2020)")
    a("--awp-gamma", type=float, default=0.005, help="AWP gamma: per-layer perturbation norm / weight norm")
    a("--awp-warmup", type=int, default=10, help="first epoch with AWP")
    a("--reweight", default="none", choices=["none", "gairat", "mail"], help="instance weights on the target term")
    a("--reweight-start", type=int, default=70, help="first epoch with --reweight / --iseat (burn-in)")
    a("--gair-lambda", type=float, default=-1.0, help="GAIRAT lambda")
    a("--mail-bias", type=float, default=-0.5, help="MAIL bias")
    a("--mail-slope", type=float, default=10.0, help="MAIL slope")
    a("--iseat", type=float, default=0.0, metavar="LAMBDA",
      help="ISEAT lambda: weighted logit-variation term under input and weight perturbation (0: off)")
    a("--clean-bn", action=argparse.BooleanOptionalAction, default=True,
      help="after f_t(x'), a no-grad train-mode f_t(x): the target's BatchNorm statistics mix clean and "
           "adversarial batches as in the release (--no-clean-bn: adversarial only, one forward cheaper)")
    # start-up (not in the paper; README "Training dynamics")
    a("--guide-warmup", type=int, default=0, metavar="EPOCHS",
      help="before the --epochs of Algorithm 1, the guide trains alone for EPOCHS epochs (lr: 0.2x, then 1x) (0: the paper)")
    a("--target-clip", type=float, default=0.0, metavar="NORM",
      help="clip the target's gradient norm at NORM in its first --target-clip-epochs epochs (0: the paper)")
    a("--target-clip-epochs", type=int, default=2, help="how many of the target's first epochs --target-clip lasts")
    # engineering
    a("--seed", type=int, default=0, help="random seed (data order, augmentation, attack starts)")
    a("--deterministic", action="store_true", help="deterministic kernels (bitwise repeatable on CPU)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
      help="autocast precision of the forward passes (auto: bf16 on CUDA that supports it, else none)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=True,
      help="channels_last memory format (faster on CUDA and, measured in bench.py, on our 2-core CPU)")
    a("--compile", action="store_true", help="torch.compile both models")
    a("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes (torchrun)")
    a("--workers", type=int, default=2, help="processes decoding an ImageFolder once at start-up")
    a("--out-dir", default="runs/dynat", help="where metrics, curves and checkpoints go")
    a("--overwrite", action="store_true", help="allow writing into a non-empty --out-dir")
    a("--resume", default=None, metavar="DIR", help="continue the run in DIR from DIR/last.pt")
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (and always at the last)")
    a("--eval-pgd-n", type=int, default=1000, help="images for the per-epoch PGD-10 check")
    a("--dry-run", action="store_true", help="one batch per epoch and one evaluation batch (smoke tests)")
    return p


def require(args, names, ok, what):
    """Raise UsageError naming the flag unless ok(value) holds for each flag in `names` (None skips)."""
    for name in names:
        v = getattr(args, name)
        if v is not None and not ok(v):
            raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {v:g}")


def validate_args(args):
    """Check every flag up front; raise UsageError with a one-line reason."""
    require(args, ("epsilon", "step_size"), lambda v: 0 < v <= 1, "in (0, 1] (pixels are in [0, 1])")
    for name in ("target", "guide"):
        try:
            check_arch(getattr(args, name))
        except ValueError as e:
            raise UsageError(f"--{name}: {e}")
    require(args, ("epochs", "batch_size", "eval_every", "eval_pgd_n"), lambda v: v >= 1, ">= 1")
    require(args, ("num_steps", "val_size", "workers", "awp_warmup", "train_size", "guide_warmup",
                   "target_clip_epochs"), lambda v: v >= 0, ">= 0")
    require(args, ("lr", "momentum", "weight_decay", "alpha", "beta", "awp_gamma", "iseat", "target_clip"),
            lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.guide_warmup and args.labels == "true":
        raise UsageError(f"--guide-warmup {args.guide_warmup} needs a guide: --labels true trains none")
    if args.awp and args.awp_warmup > args.epochs:
        raise UsageError(f"--awp-warmup {args.awp_warmup} is beyond --epochs {args.epochs}: AWP would never switch on")
    if (args.reweight != "none" or args.iseat > 0) and args.reweight_start > args.epochs:
        raise UsageError(f"--reweight-start {args.reweight_start} is beyond --epochs {args.epochs}: "
                         "the reweighting would never switch on")
    if args.dataset in ("imagefolder",) and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")


# ----------------------------------------------------------------------------- data

DATASETS = ["cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "synthetic"]
CIFAR_FILES = {"cifar10": ("CIFAR10", "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
               "cifar100": ("CIFAR100", "cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")}
MNIST_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
DEBIAN_FILES = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}  # apt-get install dataset-fashion-mnist


def _to_uint8_tensors(dataset, workers):
    """Decode a torchvision dataset of PIL images into (uint8 N x C x H x W, int64 N)."""
    import numpy as np
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers,
                                         collate_fn=lambda b: ([np.asarray(img, dtype=np.uint8) for img, _ in b],
                                                               [t for _, t in b]))
    xs, ys = [], []
    for imgs, targets in loader:
        xs.append(torch.from_numpy(np.stack(imgs)))
        ys.extend(targets)
    return xs and torch.cat(xs).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys, dtype=torch.long)


def _load_cifar(dataset, data_dir):
    """torchvision's CIFAR-10/100 (downloaded when absent), with a one-line reason when it cannot load."""
    import torchvision
    from torchvision.datasets.utils import check_integrity
    cls_name, archive, url = CIFAR_FILES[dataset]
    cls = getattr(torchvision.datasets, cls_name)
    archive_path = os.path.join(os.path.abspath(data_dir), archive)
    extracted = os.path.join(os.path.abspath(data_dir), cls.base_folder)
    if os.path.isfile(archive_path) and not check_integrity(archive_path, cls.tgz_md5):
        # torchvision would silently try to download it again and, offline, fail with a misleading reason.
        raise UsageError(f"{archive_path} is there but fails its MD5 checksum (an incomplete or corrupt "
                         f"download): delete it and download it again from {url}")
    try:
        splits = [cls(data_dir, train=train, download=True) for train in (True, False)]
    except Exception as e:  # no network, bad archive, ...: say what to put where
        if os.path.isdir(extracted):
            raise UsageError(f"{extracted} is incomplete or corrupt (a file is missing or fails its MD5 "
                             f"checksum): delete it and put {archive} (from {url}) into {os.path.dirname(extracted)}/")
        raise UsageError(f"cannot load {dataset} from {data_dir} ({type(e).__name__}); "
                         f"put {archive} (from {url}) into {os.path.abspath(data_dir)}/")
    return splits, [torch.from_numpy(ds.data).permute(0, 3, 1, 2) for ds in splits]


def _load_mnist(dataset, data_dir):
    """torchvision's MNIST / Fashion-MNIST (downloaded when absent). Offline, the four original idx .gz
    files copied into DATA_DIR/<MNIST|FashionMNIST>/raw/ are used (extracted there as torchvision would:
    its own check would reject recompressed copies such as Debian's by their MD5 and try to download)."""
    import gzip
    import shutil
    import torchvision
    cls = getattr(torchvision.datasets, MNIST_CLASSES[dataset])
    raw = os.path.join(os.path.abspath(data_dir), cls.__name__, "raw")
    files = [name for name, _ in cls.resources]
    for name in files:
        gz, plain = os.path.join(raw, name), os.path.join(raw, name[:-len(".gz")])
        if os.path.isfile(gz) and not os.path.isfile(plain):
            try:
                def gunzip(f, gz=gz):
                    with gzip.open(gz) as src:
                        shutil.copyfileobj(src, f)
                write_atomic(plain, gunzip)
            except (OSError, EOFError) as e:
                raise UsageError(f"{gz}: not a valid gzip file ({e}); copy it again")
    try:
        splits = [cls(data_dir, train=train, download=True) for train in (True, False)]
    except Exception as e:
        where = f"cp {DEBIAN_FILES[dataset]}/*.gz {raw}/ after apt-get install dataset-fashion-mnist, or " \
            if dataset in DEBIAN_FILES else ""
        raise UsageError(f"cannot load {dataset} from {data_dir} ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:80].rstrip(':')}); put {', '.join(files)} into {raw}/ "
                         f"({where}from {cls.mirrors[0]})")
    # 28 x 28 grey images repeated into 3 channels: the models and the attack see RGB-shaped [0, 1] pixels.
    return splits, [ds.data[:, None].expand(-1, 3, -1, -1) for ds in splits]


def load_data(dataset, data_dir, workers=2):
    """Return dict(train=(x, y), test=(x, y), classes=C) with x uint8 N x 3 x H x W in memory.

    Whole datasets live as uint8 tensors on the training device: CIFAR is 150 MB, and
    augmenting on the device removes the data loader from the step (airbench's trick).
    """
    import torchvision
    if dataset == "synthetic":
        g = torch.Generator().manual_seed(12345)  # fixed, whatever --seed is: a benchmark's data
        make = lambda n: (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                          torch.randint(0, 10, (n,), generator=g))
        return {"train": make(1024), "test": make(256), "classes": 10}
    if dataset in CIFAR_FILES or dataset in MNIST_CLASSES:
        splits, images = (_load_cifar if dataset in CIFAR_FILES else _load_mnist)(dataset, data_dir)
        out = {name: (x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long))
               for name, ds, x in zip(("train", "test"), splits, images)}
        out["classes"] = len(splits[0].classes)
        return out
    # imagefolder: DATA_DIR/{train,test}/<class>/<image>
    from PIL import Image
    roots = [os.path.join(data_dir, s) for s in ("train", "test")]
    for r in roots:
        if not os.path.isdir(r):
            raise UsageError(f"{r}: no such directory (imagefolder expects DATA_DIR/train/<class>/ and DATA_DIR/test/<class>/)")
    try:
        folders = [torchvision.datasets.ImageFolder(r) for r in roots]
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"imagefolder {data_dir}: {str(e).splitlines()[0]}")
    if folders[0].classes != folders[1].classes:
        raise UsageError(f"imagefolder {data_dir}: train and test have different classes "
                         f"({len(folders[0].classes)} vs {len(folders[1].classes)})")
    size = Image.open(folders[0].samples[0][0]).size
    out = {"classes": len(folders[0].classes)}
    for name, ds in zip(("train", "test"), folders):
        # Every image is made RGB and, if it differs, resized to the first training image's size.
        ds.transform = lambda img: img.convert("RGB") if img.size == size else img.convert("RGB").resize(size)
        out[name] = _to_uint8_tensors(ds, workers)
    return out


def class_balanced_subset(train, size, classes):
    """--train-size: the first size // classes training images of every class, in the dataset's order."""
    x, y = train
    if size == 0:
        return train
    per_class = size // classes
    counts = torch.bincount(y, minlength=classes)
    if per_class < 1 or per_class > counts.min():
        raise UsageError(f"--train-size {size}: needs between {classes} and {int(counts.min()) * classes} images "
                         f"({classes} classes, the smallest has {int(counts.min())} training images)")
    keep = torch.cat([(y == c).nonzero().squeeze(1)[:per_class] for c in range(classes)]).sort().values
    return x[keep], y[keep]


def split_validation(train, val_size, seed):
    """Hold out `val_size` training images (a fixed permutation of --seed) for model selection."""
    x, y = train
    if val_size == 0:
        return train, None
    if val_size >= len(y):
        raise UsageError(f"--val-size {val_size} must be smaller than the training set ({len(y)} images)")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[:-val_size], perm[-val_size:]
    return (x[tr], y[tr]), (x[va], y[va])


def augment(x):
    """Random crop 32 with 4-pixel zero padding + horizontal flip, per example (Sec. 4.1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b, 1, 1), device=x.device)
    dx = torch.randint(0, 9, (b, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(b, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(b, h, w)
    flip = torch.rand(b, 1, 1, device=x.device) < 0.5
    cols = torch.where(flip, dx + (w - 1) - (cols - dx), cols)
    idx = (rows * (w + 8) + cols).view(b, 1, h * w).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, idx).view_as(x)


def train_batch(images, labels, idx, device, channels_last=False):
    """Training batch `idx` of the dataset (uint8 images N x 3 x H x W, int64 labels, on the device):
    float [0, 1] B x 3 x H x W, augmented, channels_last when asked, and its labels."""
    x = augment(to_input(images[idx], device))
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), labels[idx]


def epoch_batches(n, batch_size, seed, epoch, world=1, device="cpu", limit=None):
    """The epoch's shuffled index batches, on `device` in one copy per epoch (no blocking copy per
    step): a pure function of (seed, epoch), so a resumed run sees exactly the order the interrupted
    one would have seen. A last batch too small to give every process an image is dropped."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)
    batches = perm.split(batch_size)[:limit]
    return batches[:-1] if len(batches[-1]) < world else batches


def step_seed(seed, epoch, step, rank):
    """Seed for one step's randomness (augmentation, attack start): exact resume at any batch."""
    return (((seed * 100_003 + epoch) * 1_000_003 + step) * 1_009 + rank) % (2 ** 63)


# ----------------------------------------------------------------------------- precision

def native_bf16(device):
    """True on a GPU whose tensor cores run bf16 (Ampere and newer); on older GPUs bf16 is emulated, slowly."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def amp_dtype(amp, device):
    """Autocast dtype for --amp (None = float32); auto = bf16 only where the GPU runs it natively."""
    if amp == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def attack_dtype(amp, device):
    """The attack's precision in a run whose forwards use `amp`: never fp16. In fp16 the input gradient
    of a confidently classified point underflows to exactly 0, sign(0) = 0 and PGD stops moving, so the
    model would be trained (or scored) on almost clean inputs; bf16 has float32's range. Under fp16 the
    attack runs in bf16 where the GPU runs it natively, else in float32."""
    if amp != torch.float16:
        return amp
    return torch.bfloat16 if native_bf16(device) else None


def autocast(device, dtype):
    # Autocast only casts matmuls/convs: BatchNorm parameters, statistics and the input
    # perturbation stay float32.
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------- attack

def margin_loss(logits, y):
    """C&W margin loss -(z_y - max_{j != y} z_j) per example (the AT literature's CW-inf)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return -(z_y - z_other)


def perturb(model, x, y, *, epsilon, step_size, num_steps, loss="ce", start="normal", amp=None):
    """Inner maximisation: K steps of signed-gradient ascent in the L-inf eps-ball around x.

    loss: "ce"  CE(f(x'), y)                 (PGD-AT; DYNAT's Eq. 7 with y = y_dyn)
          "kl"  KL(p(f(x)) || p(f(x')))      (TRADES/LBGAT, the paper's default DYNAT attack)
          "cw"  margin loss (C&W-inf)
    start: "normal" x + 0.001 N(0, I) (TRADES/LBGAT/DYNAT code), "uniform" x + U(-eps, eps) (evaluation).
    amp: autocast dtype of the model's forwards; fp16 is replaced by bf16 or float32 (attack_dtype).
    The model runs in eval mode with its parameters frozen (only the input gradient is needed);
    both are restored on return. Returns (x_adv, kappa) with kappa[i] = number of iterates, checked
    before each update, that the model still classified as y[i] (GAIRAT's geometry value; an
    evaluation scores a point robust only if kappa = K and x_adv is classified correctly too).
    """
    amp = attack_dtype(amp, x.device)
    was_training = model.training
    frozen = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        if loss == "kl":
            with torch.no_grad(), autocast(x.device, amp):
                p_nat = F.softmax(model(x).float(), dim=1)
        noise = 0.001 * torch.randn_like(x) if start == "normal" else torch.empty_like(x).uniform_(-epsilon, epsilon)
        x_adv = torch.min(torch.max(x + noise, x - epsilon), x + epsilon).clamp(0, 1)
        kappa = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for _ in range(num_steps):
            x_adv.requires_grad_(True)
            with autocast(x.device, amp):
                logits = model(x_adv).float()
            kappa += (logits.argmax(1) == y).long()
            if loss == "ce":
                objective = F.cross_entropy(logits, y, reduction="sum")
            elif loss == "kl":
                objective = F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum")
            elif loss == "cw":
                objective = margin_loss(logits, y).sum()
            else:
                raise ValueError(f"unknown attack loss {loss!r}")
            grad, = torch.autograd.grad(objective, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp(0, 1)  # projection
        return x_adv.detach(), kappa
    finally:
        model.train(was_training)
        for p, r in zip(model.parameters(), frozen):
            p.requires_grad_(r)


# ----------------------------------------------------------------------------- loss (Algorithm 1)

def dynamic_labels(logits_guide):
    """Eq. 3: y_dyn = onehot(argmax f_g(x)) as class indices; no gradient, ties -> lowest index."""
    return logits_guide.detach().argmax(dim=1)


def gairat_weights(kappa, num_steps, lam):
    """GAIRAT: w_i = (1 + tanh(lam + 5 (1 - 2 kappa_i / K))) / 2, normalised to mean 1."""
    w = 0.5 * (1 + torch.tanh(lam + 5 * (1 - 2 * kappa.float() / max(num_steps, 1))))
    return w / w.mean()


def mail_weights(logits_adv, y, bias, slope):
    """MAIL: PM_i = max_{j != y} p_j - p_y on f_t(x'); w_i = sigmoid(slope (PM_i + bias)), mean 1."""
    p = F.softmax(logits_adv.detach().float(), dim=1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    p_other = p.masked_fill(F.one_hot(y, p.shape[1]).bool(), -1.0).amax(1)
    w = torch.sigmoid(slope * (p_other - p_y + bias))
    return w / w.mean()


def iseat_weights(vulnerability):
    """ISEAT rank-linear weights: sorted ascending by vulnerability, the k-th example gets k/B."""
    ranks = vulnerability.argsort().argsort() + 1
    return ranks.float() / len(vulnerability)


def awp_perturbation(model, loss, gamma, average=None):
    """AWP (Wu et al. 2020) without a proxy model: for each conv/linear weight w,
    v = gamma * ||w|| * g / ||g|| with g = d loss / d w (one ascent step of a proxy, rescaled
    per layer to ||w||, so the proxy's learning rate cancels). Returns {name: gamma * v}.
    `average` (optional) averages the gradients across processes first."""
    # Frozen weights stay unperturbed, as a proxy's SGD step would leave them.
    named = [(n, p) for n, p in model.named_parameters() if p.ndim > 1 and p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    if average is not None:
        grads = average(list(grads))
    # nan_to_num: a layer whose (fp16-scaled) gradient overflowed is left unperturbed this step.
    return {n: torch.nan_to_num(gamma * p.detach().norm() * g / (g.norm() + 1e-20), 0.0, 0.0, 0.0)
            for (n, p), g in zip(named, grads)}


@contextlib.contextmanager
def frozen_bn_stats(model):
    """Leave BatchNorm running statistics untouched by the forwards inside (AWP's proxy pass)."""
    saved = {n: b.clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


def target_loss(target, x, x_adv, y_train, *, beta, alpha, labels="dynamic", logits_guide=None,
                label_smoothing=0.0, weight_fn=None, weights_delta=None, clean_bn=False, amp=None):
    """The target's terms of Eq. 6: beta * L_t(f_t(x'), y_dyn) (Eq. 5) + alpha * KL_batchmean(p(f_t(x)) || p(f_t(x'))).

    labels="lbgat" replaces CE by LBGAT's MSE(f_t(x'), f_g(x)) (gradient into the guide).
    weight_fn(logits_adv) -> per-example weights (GAIRAT/MAIL) or None.
    weights_delta: {param name: delta}; the forwards use w + delta (AWP) without touching w.
    clean_bn: with alpha = 0, still run f_t(x) after f_t(x'), without gradient, for its BatchNorm statistics.
    Returns (loss, logits_adv).
    """
    params = None
    if weights_delta:
        params = {n: p + weights_delta[n] for n, p in target.named_parameters() if n in weights_delta}
    forward = (lambda inp: functional_call(target, params, (inp,))) if params else target
    with autocast(x.device, amp):
        logits_adv = forward(x_adv).float()
        logits_nat = forward(x).float() if alpha > 0 else None
    if clean_bn and alpha == 0:
        # The release runs the target in train mode on x' and then on x every step (its clean output
        # unused at alpha = 0): the running statistics used at evaluation mix adversarial and clean
        # batches. Same order, same weights (w + delta under AWP), no graph.
        with torch.no_grad(), autocast(x.device, amp):
            forward(x)
    if labels == "lbgat":
        per_example = F.mse_loss(logits_adv, logits_guide, reduction="none").mean(1)
    else:
        per_example = F.cross_entropy(logits_adv, y_train, reduction="none", label_smoothing=label_smoothing)
    if weight_fn is not None:
        per_example = per_example * weight_fn(logits_adv)
    loss = beta * per_example.mean()
    if alpha > 0:
        loss = loss + alpha * F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1),
                                       reduction="batchmean")
    return loss, logits_adv


def dynat_loss(target, guide, x, y, *, epsilon, step_size, num_steps, inner=False, alpha=0.0, beta=1.0,
               labels="dynamic", label_smoothing=0.0, reweight="none", gair_lambda=-1.0, mail_bias=-0.5,
               mail_slope=10.0, awp_gamma=0.0, iseat=0.0, clean_bn=True, amp=None, loss_scale=None, average=None):
    """Algorithm 1 for one batch: returns (loss, stats) with loss = L_g + beta L_t [+ variants] (Eq. 6).

    x: float B x 3 x H x W in [0, 1] (unnormalised pixels: epsilon and step_size are in those units);
    y: int64 B ground truth. Both models in train mode. stats: detached 0-dim tensors on x's device:
    loss_guide (L_g, 0 with labels="true"), loss_target (beta L_t + alpha KL), loss_iseat (with
    iseat > 0) and dyn_correct (how many dynamic labels equal y; absent with labels="true").

    No hidden side effects: grads are not zeroed, nothing is stepped, both models are left in
    the mode they came in (train), the target's weights are never modified (AWP evaluates at
    w + delta functionally). Only BatchNorm running statistics move, as in any train-mode forward:
    the target's on x' and then on x (clean_bn, the release's statistics; clean_bn=False leaves them
    adversarial-only unless alpha > 0 or ISEAT runs f_t(x) anyway), the guide's once on x.
    `awp_gamma` 0 / `iseat` 0 / reweight "none" switch those parts off.
    `loss_scale` (fp16 GradScaler.scale) and `average` (cross-process mean) serve AWP's gradient.
    """
    stats = {}
    # Eq. 4 and Eq. 3: the guide sees the clean batch once; its argmax is the dynamic label.
    if labels == "true":
        loss_guide, logits_guide, y_dyn = x.new_zeros(()), None, y
    else:
        with autocast(x.device, amp):
            logits_guide = guide(x).float()
        loss_guide = F.cross_entropy(logits_guide, y)
        y_dyn = dynamic_labels(logits_guide)
        stats["dyn_correct"] = (y_dyn == y).sum()
    y_train = y if labels == "true" else y_dyn

    # Eq. 7 (--inner) or the TRADES/LBGAT KL attack, on the frozen target.
    x_adv, kappa = perturb(target, x, y_train, epsilon=epsilon, step_size=step_size, num_steps=num_steps,
                           loss="ce" if inner else "kl", amp=amp)

    weight_fn = None
    if reweight == "gairat":
        w = gairat_weights(kappa, num_steps, gair_lambda)
        weight_fn = lambda logits_adv: w
    elif reweight == "mail":
        weight_fn = lambda logits_adv: mail_weights(logits_adv, y_train, mail_bias, mail_slope)
    terms = dict(beta=beta, alpha=alpha, labels=labels, logits_guide=logits_guide,
                 label_smoothing=label_smoothing, weight_fn=weight_fn, amp=amp)

    # AWP: ascend the target's own loss in weight space; BN statistics stay as they were.
    delta = None
    if awp_gamma > 0:
        with frozen_bn_stats(target):
            loss_awp, _ = target_loss(target, x, x_adv, y_train, **dict(
                terms, logits_guide=None if logits_guide is None else logits_guide.detach()))
            # inside the block: BatchNorm's backward reads the statistics restored on exit
            delta = awp_perturbation(target, loss_scale(loss_awp) if loss_scale else loss_awp, awp_gamma, average)

    # Eq. 5: the target learns the dynamic labels on x' (at w + delta under AWP); ISEAT's own
    # forward of x refreshes the clean statistics when it runs.
    loss_target, logits_adv = target_loss(target, x, x_adv, y_train, weights_delta=delta,
                                          clean_bn=clean_bn and iseat == 0, **terms)
    loss = loss_guide + loss_target
    stats.update(loss_guide=loss_guide.detach(), loss_target=loss_target.detach())

    if iseat > 0:  # ISEAT: rank-weighted logit change between f_{w+delta}(x') and f_w(x)
        with autocast(x.device, amp):
            logits_nat = target(x).float()
        vulnerability = (F.cross_entropy(logits_adv, y_train, reduction="none")
                         - F.cross_entropy(logits_nat, y_train, reduction="none")).detach()
        loss_iseat = iseat * (iseat_weights(vulnerability) * (logits_adv - logits_nat).pow(2).sum(1)).mean()
        loss = loss + loss_iseat
        stats["loss_iseat"] = loss_iseat.detach()
    return loss, stats


# ----------------------------------------------------------------------------- train / eval loops

def learning_rate(epoch, base_lr, epochs):
    """Released-code schedule: epoch 1 at 0.2 lr (warm start), x0.1 after 75 %, x0.01 after 90 % of
    the epochs (epochs 76 and 91 of 100); epochs are counted from 1."""
    if epoch == 1:
        return 0.2 * base_lr
    if epoch > int(0.9 * epochs):
        return 0.01 * base_lr
    if epoch > int(0.75 * epochs):
        return 0.1 * base_lr
    return base_lr


def last_epoch(args):
    """The run's last epoch: --guide-warmup's epochs come before the --epochs of Algorithm 1."""
    return args.guide_warmup + args.epochs


def paper_epoch_and_lr(args, epoch):
    """(the paper's epoch, its learning rate) for a run's `epoch`. --guide-warmup's epochs come first,
    numbered <= 0 in the paper's schedule, with the guide's own warm start: 0.2 lr, then lr (at 0.2 lr
    throughout, 2 warm-up epochs left the guide too weak to save the target on seed 0 of README's setting)."""
    paper_epoch = epoch - args.guide_warmup
    if paper_epoch <= 0:
        return paper_epoch, (0.2 if epoch == 1 else 1.0) * args.lr
    return paper_epoch, learning_rate(paper_epoch, args.lr, args.epochs)


def to_input(x_uint8, device, channels_last=False):
    """uint8 images -> float [0, 1] on `device` (the models see unnormalised pixels)."""
    x = x_uint8.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def classify(model, x, y, *, device, batch_size=256, attack=None, amp=None, channels_last=False,
             fixed_shape=False, progress=None):
    """(predicted class int64, correct bool) per image of the uint8 images x, both on the CPU, with
    `model` in eval mode (and left as it came). Clean when `attack` is None; else under
    perturb(**attack), where a point is correct only if the model classified it correctly at every
    iterate the attack visited (the start, after each step, the end), not only at the last one.
    fixed_shape pads the last chunk to batch_size with copies of an image (dropped from the result):
    every forward then has one shape, so cuDNN autotunes once and a compiled model does not
    recompile for the size of each evaluated subset."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            n = len(yb)
            if fixed_shape and n < batch_size:
                xb = torch.cat([xb, xb[:1].expand(batch_size - n, *xb.shape[1:])])
                yb = torch.cat([yb, yb[:1].expand(batch_size - n)])
            xb, yb = to_input(xb, device, channels_last), yb.to(device)
            every = torch.ones_like(yb, dtype=torch.bool)
            if attack is not None:
                xb, kappa = perturb(model, xb, yb, amp=amp, **attack)
                every = kappa == attack["num_steps"]  # correct at each iterate before the last
            with torch.no_grad(), autocast(device, amp):
                pred = model(xb).argmax(1)
            out.append(torch.stack([pred, every & (pred == yb)])[:, :n].cpu())  # one copy per chunk
            if progress is not None:
                progress.update(n)
    finally:
        model.train(was_training)
    pred, correct = torch.cat(out, 1) if out else torch.zeros(2, 0, dtype=torch.long)
    return pred, correct.bool()


def correct_mask(model, x, y, **kw):
    """Per-example correctness (bool, on CPU): classify(...)'s second half."""
    return classify(model, x, y, **kw)[1]


def robust_mask(model, x, y, attack, *, clean=None, restarts=1, progress=None, **common):
    """Per-example robustness under perturb(**attack): correct clean and at every iterate of each of
    `restarts` random starts (each restart attacks only the points still robust). `clean` reuses a
    clean correct_mask; `progress` (tqdm) grows by the points each restart attacks."""
    robust = (correct_mask(model, x, y, **common) if clean is None else clean).clone()
    for _ in range(restarts):
        idx = robust.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        if progress is not None:
            progress.total += len(idx)
        robust[idx] = correct_mask(model, x[idx], y[idx], attack=attack, progress=progress, **common)
    return robust


def loss_settings(args, epoch):
    """dynat_loss keyword arguments for `epoch`, with the AWP warm-up and the reweighting burn-in."""
    late = epoch >= args.reweight_start
    return dict(epsilon=args.epsilon, step_size=args.step_size, num_steps=args.num_steps, inner=args.inner,
                alpha=args.alpha, beta=args.beta, labels=args.labels, label_smoothing=args.label_smoothing,
                reweight=args.reweight if late else "none", gair_lambda=args.gair_lambda,
                mail_bias=args.mail_bias, mail_slope=args.mail_slope,
                awp_gamma=args.awp_gamma if args.awp and epoch >= args.awp_warmup else 0.0,
                iseat=args.iseat if late else 0.0, clean_bn=args.clean_bn)


def guide_warmup_loss(guide, x, y, amp=None):
    """--guide-warmup: Eq. 4 alone, (L_g, stats) with dynat_loss's keys; the target is not trained."""
    with autocast(x.device, amp):
        logits_guide = guide(x).float()
    loss_guide = F.cross_entropy(logits_guide, y)
    return loss_guide, {"loss_guide": loss_guide.detach(), "loss_target": torch.zeros_like(loss_guide.detach()),
                        "dyn_correct": (dynamic_labels(logits_guide) == y).sum()}


def optimizer_step(loss, optimizer, scaler, models, world=1, sync_buffers=True, clip=None):
    """Eq. 6's joint minimisation: backward, average across processes, one SGD step of both models.
    clip = (parameters, max_norm): --target-clip, on the averaged (and unscaled) gradient, so that
    every process clips the same; clip_grad_norm_ leaves its norm on the device (no host read)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if world > 1:
        sync_replicas(models, world, grads=True, buffers=sync_buffers)
    if clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(*clip)
    scaler.step(optimizer)
    scaler.update()


STEP_STATS = ("loss_guide", "loss_target", "loss_iseat", "dyn_correct")  # summed over an epoch's steps
STOP_FLAGS = ("stop_sigint", "stop_sigterm")  # GracefulStop.SIGNALS' flags: after STEP_STATS under torchrun


def new_epoch_sums():
    """An epoch's running sums (host floats): STEP_STATS, images seen, steps done, seconds. A
    checkpoint saves them mid-epoch, so a resumed epoch reports what an uninterrupted one would."""
    return dict.fromkeys(STEP_STATS + ("seen", "step", "seconds"), 0.0) | {"step": 0}


def step_values(stats, share, stop_flags=None):
    """The step's statistics as one float tensor on the device: losses times the process's share of
    the batch (so their sum over processes is `world` times the global batch's mean), correct dynamic
    labels counted; under torchrun followed by this process's STOP_FLAGS, all for one all-reduce.
    (zero + flag is a fill on the device: new_tensor(flag) would be a copy that waits for the GPU.)"""
    zero = stats["loss_guide"].new_zeros(())
    values = [stats.get(k, zero).float() * (share if k.startswith("loss") else 1.0) for k in STEP_STATS]
    if stop_flags is not None:
        values += [zero + flag for flag in stop_flags]
    return torch.stack(values)


def add_step(sums, values, world, batch_size, where):
    """Add one step's host values {name: sum over the processes} to `sums`; stop on a non-finite loss
    before anything is saved, so last.pt stays the last good state."""
    for name in STEP_STATS:
        if not math.isfinite(values[name]):
            raise NonFiniteLoss(f"{name} is {values[name]} {where}")
        sums[name] += values[name] / world if name.startswith("loss") else values[name]
    sums["seen"] += batch_size
    sums["step"] += 1


def train_epoch(trainer, epoch, sums, stop):
    """One epoch of Algorithm 1 over the shuffled training set, from batch sums["step"] on, adding
    the steps' statistics to `sums`. Returns the signal that stopped it at a batch boundary, or None."""
    args, rank, world = trainer.args, trainer.rank, trainer.world
    paper_epoch, lr = paper_epoch_and_lr(args, epoch)  # paper_epoch <= 0 during --guide-warmup
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    settings = loss_settings(args, paper_epoch)
    clip = None
    if args.target_clip > 0 and 1 <= paper_epoch <= args.target_clip_epochs:
        clip = (list(trainer.target.parameters()), args.target_clip)  # the target's first epochs only
    batches = epoch_batches(len(trainer.labels), args.batch_size, args.seed, epoch, world, trainer.device,
                            limit=1 if args.dry_run else None)
    bar = progress_bar(len(batches), sums["step"], f"epoch {epoch}", trainer.main_process)
    t0, signum = time.time(), None
    for step in range(int(sums["step"]), len(batches)):
        # Every random draw of a step is a function of (seed, epoch, step): a resumed run continues exactly.
        torch.manual_seed(step_seed(args.seed, epoch, step, 0))
        x, y = train_batch(trainer.images, trainer.labels, batches[step], trainer.device, trainer.channels_last)
        share = 1.0
        if world > 1:
            # N processes see exactly the images one process would: the global batch is augmented
            # identically everywhere, then split; each process's attack draws from its own seed.
            x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
            torch.manual_seed(step_seed(args.seed, epoch, step, rank))
            # Unequal shares: weight each process's mean so that the average is the global batch's mean.
            share = len(y) * world / len(batches[step])
        if paper_epoch <= 0:
            loss, stats = guide_warmup_loss(trainer.guide, x, y, amp=trainer.amp)
        else:  # Algorithm 1, Eq. 3-7; AWP's weight gradient averaged like the loss's (share-weighted)
            average = (lambda grads: all_mean([g * share for g in grads], world)) if world > 1 else None
            loss, stats = dynat_loss(trainer.target, trainer.guide, x, y, **settings, amp=trainer.amp,
                                     loss_scale=trainer.scaler.scale, average=average)
        optimizer_step(loss * share, trainer.optimizer, trainer.scaler, trainer.models, world,
                       sync_buffers=not args.sync_bn, clip=clip)
        values = step_values(stats, share, stop.flags() if world > 1 else None)
        if world > 1:
            dist.all_reduce(values)  # statistics and stop flags summed over the processes, one collective
        # The step's one host read, after the whole step is queued: the GPU works through the step while
        # the CPU waits here (it idles only while the next step's first kernels are launched).
        values = dict(zip(STEP_STATS + STOP_FLAGS, values.tolist()))
        add_step(sums, values, world, len(batches[step]), f"at epoch {epoch}, batch {step + 1}; "
                                                          f"{trainer.last_path} holds the last good state")
        bar.update(1)
        bar.set_postfix(loss=f"{(values['loss_guide'] + values['loss_target']) / world:.3f}", refresh=False)
        signum = stop.received_by_any([values[f] for f in STOP_FLAGS] if world > 1 else None)
        if signum:
            break
    bar.close()
    sums["seconds"] += time.time() - t0
    return signum


def progress_bar(total, initial, desc, main_process):
    """tqdm's bar on an interactive terminal only: a log redirected to a file gets one line per epoch."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, leave=False, mininterval=1.0, dynamic_ncols=True,
                disable=not (main_process and sys.stderr.isatty()))


def evaluate_epoch(trainer, epoch):
    """Per-epoch figures on rank 0: clean accuracy of both models on the test set and how many
    classes each predicts there (1 = a dead model), PGD-10 of the target on the validation split
    when there is one (else on the first --eval-pgd-n test images)."""
    args, data = trainer.args, trainer.data
    # PGD's random starts from a seed of their own: the same after a resume that ran no step of the epoch.
    torch.manual_seed(step_seed(args.seed, epoch, 1_000_000, 0))
    (x_test, y_test), val = data["test"], data["val"]
    limit = args.batch_size if args.dry_run else len(y_test)
    common = dict(device=trainer.device, batch_size=max(args.batch_size, 256), amp=trainer.amp,
                  channels_last=trainer.channels_last, fixed_shape=trainer.fixed_shapes)
    row = {}
    for name, model in (("guide", trainer.guide), ("target", trainer.target)):
        if model is None:
            row.update({f"{name}_clean_acc": None, f"{name}_pred_classes": None})
            continue
        pred, correct = classify(model, x_test[:limit], y_test[:limit], **common)
        row.update({f"{name}_clean_acc": correct.float().mean().item(), f"{name}_pred_classes": len(pred.unique())})
    x_pgd, y_pgd = val if val is not None else (x_test, y_test)
    n = min(args.eval_pgd_n, len(y_pgd), limit)
    pgd10 = dict(epsilon=args.epsilon, step_size=args.step_size, num_steps=10, loss="ce", start="uniform")
    row["target_pgd_acc"] = robust_mask(trainer.target, x_pgd[:n], y_pgd[:n], pgd10, **common).float().mean().item()
    return row | {"pgd_split": "val" if val is not None else "test", "pgd_n": n}


def first_free_epoch(args):
    """The run's first epoch in which the target trains unhindered: after --guide-warmup and, with
    --target-clip, after its clipped epochs (a clipped target is slow by design, not stalled)."""
    return args.guide_warmup + 1 + (args.target_clip_epochs if args.target_clip > 0 else 0)


def collapse_warning(row, classes, first_target_epoch, steps_per_epoch, guide_warmup=0):
    """A one-line diagnosis when the target is dead (one predicted class, from its second epoch on) or
    far behind its own labels (clean accuracy under half the dynamic labels' agreement with y, from
    its third epoch on) while those labels are clearly better than chance (at least twice chance);
    None for a healthy target or a run without a guide. The remedy it names is sized from README's
    measurements, about 80 steps of the guide alone before the target starts, and is always more
    than the run's own `guide_warmup`."""
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
            "class-hopping early labels, which pushes its last ReLUs to zero (README, 'Training dynamics'); "
            f"rerun with --guide-warmup {warmup} (about 80 steps of the guide alone first, at {steps_per_epoch} "
            f"steps per epoch{f'; this run had {guide_warmup}' if guide_warmup else ''}), or --target-clip 0.5")


# ----------------------------------------------------------------------------- checkpoints

def write_atomic(path, write, mode="wb"):
    """write(file) into a temp file, fsync, rename: a kill at any moment leaves the old file whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def save_atomic(obj, path):
    """torch.save(obj, path) through write_atomic."""
    write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path):
    """torch.load(weights_only=True) with one-line errors; nothing in the file is ever executed."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a legacy pickle
        raise UsageError(f"{path}: not a checkpoint (torch.save writes a zip archive or a pickle; this file "
                         f"starts with {head!r}): pass a last.pt / best.pt or a saved state_dict")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{path}: refused: it holds objects that need arbitrary code to unpickle "
                         "(only tensors and plain containers are loaded)")
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{path}: truncated or corrupt checkpoint ({reason})")


def load_weights(model, state_dict, source, log=print):
    """Strictly load a state_dict after remap_state_dict's logged key mapping; mismatches are
    reported in one line naming `source` (never strict=False)."""
    if not isinstance(state_dict, dict):
        raise UsageError(f"{source}: not a state_dict")
    state_dict, notes = remap_state_dict(state_dict)
    for note in notes:
        log(f"{source}: {note}")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    if missing or extra:
        raise UsageError(f"{source}: keys do not match the architecture: {len(missing)} missing"
                         f"{' (' + missing[0] + ', ...)' if missing else ''}, {len(extra)} unexpected"
                         f"{' (' + extra[0] + ', ...)' if extra else ''}")
    for k, v in own.items():
        if not torch.is_tensor(state_dict[k]) or state_dict[k].shape != v.shape:
            shape = tuple(state_dict[k].shape) if torch.is_tensor(state_dict[k]) else type(state_dict[k]).__name__
            raise UsageError(f"{source}: {k} has shape {shape}, the architecture needs {tuple(v.shape)} "
                             "(another architecture or class count?)")
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------- processes

def init_processes(device_arg):
    """(rank, world, device): one process, or torchrun's world with NCCL on CUDA and gloo on CPU."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    name = ("cuda" if torch.cuda.is_available() else "cpu") if device_arg == "auto" else device_arg
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {device_arg!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device_arg}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and world > 1:
        raise UsageError(f"--device {device_arg}: under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_mean(tensors, world):
    """Mean of each tensor over the processes, in one flat all-reduce."""
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    return [chunk.view_as(t).to(t.dtype) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def sync_replicas(models, world, grads=True, buffers=True):
    """Data parallelism by hand: average the gradients (what DDP's reducer does) and, without
    --sync-bn, copy rank 0's BatchNorm statistics everywhere (DDP's broadcast_buffers)."""
    if grads:
        params = [p for m in models for p in m.parameters() if p.grad is not None]
        for p, g in zip(params, all_mean([p.grad for p in params], world)):
            p.grad.copy_(g)
    if buffers:
        floats = [b for m in models for b in m.buffers() if b.is_floating_point()]
        flat = torch.cat([b.reshape(-1) for b in floats])
        dist.broadcast(flat, 0)
        for b, chunk in zip(floats, flat.split([b.numel() for b in floats])):
            b.copy_(chunk.view_as(b))


def check_replicas(models):
    """Stop if any parameter or buffer differs bitwise from rank 0's (replicas drifting apart)."""
    tensors = [t.detach() for m in models for t in list(m.parameters()) + list(m.buffers())]
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    differs = torch.tensor([float(not torch.equal(flat, reference))], device=flat.device)
    dist.all_reduce(differs)
    if differs.item():
        raise RuntimeError("model replicas differ across processes; data parallelism is broken")


class AllReduceSum(torch.autograd.Function):
    """Sum over the processes whose backward sums the gradients too: every process's loss depends on
    the sum, so each input's gradient collects all of them (torch.distributed.nn's deprecated all_reduce)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with the statistics of the global batch across processes (gloo or NCCL). Moments
    are summed by an autograd-aware all-reduce, so the gradient is that of the one-process batch."""

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        xf, c = x.float(), x.shape[1]
        count = torch.full((1,), x.numel() / c, dtype=torch.float32, device=x.device)  # a fill: no host copy
        sums = AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), xf.pow(2).sum((0, 2, 3)), count]))
        n = sums[-1]
        mean = sums[:c] / n
        var = (sums[c:2 * c] / n - mean.pow(2)).clamp(min=0)  # E[x^2] - mean^2 can round below 0
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (xf - mean.view(1, c, 1, 1)) * scale.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def synchronise_batchnorm(model):
    """--sync-bn: every BatchNorm2d becomes a GlobalBatchNorm2d (same state_dict keys), on a CPU and a
    GPU alike. (torch's SyncBatchNorm refuses CPU tensors, and on a GPU reads a count back to the
    host in every layer of every train-mode forward: about 100 host syncs per WRN-34-10 step.)"""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            bn = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            synchronise_batchnorm(child)
    return model


def load_in_turns(rank, world, load):
    """load() under torchrun without two processes writing one download: global rank 0 first, then the
    first process of each other node (a node-local --data-dir), then everyone else, who read what is
    there. The waits use a gloo group with a two-hour timeout: the NCCL group's default ten minutes
    would kill the waiting processes during a slow download, while the training collectives keep that
    default so that a real hang still fails."""
    if world == 1:
        return load()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
    turn = 0 if rank == 0 else 1 if int(os.environ.get("LOCAL_RANK", "0")) == 0 else 2
    data = None
    for t in range(3):
        if t == turn:
            data = load()
        dist.barrier(group=group)
    dist.destroy_process_group(group)
    return data


class GracefulStop:
    """SIGINT/SIGTERM ask the training loop to save last.pt and stop at the next batch boundary; a
    second signal stops at once (KeyboardInterrupt). The previous handlers come back on exit."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def flags(self):
        """This process's flags, one per signal, to be summed over the processes with the step's statistics."""
        return [float(self.received == s) for s in self.SIGNALS]

    def received_by_any(self, summed_flags=None):
        """The signal to stop on now: this process's own, or under torchrun (summed_flags) any process's,
        so that every process stops at the same batch."""
        if summed_flags is None:
            return self.received
        return next((s for s, f in zip(self.SIGNALS, summed_flags) if f > 0), None)


def configure_backends(deterministic):
    """--deterministic: deterministic kernels (bitwise repeatable on a CPU). Else cuDNN autotunes
    (the training shapes are fixed; evaluation pads to one shape) and fp32 matmuls/convs use TF32."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def provenance():
    """The commit (with '+dirty' for uncommitted changes) and library versions a result was made with."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, ""
    return {"commit": commit and commit + "+dirty" * bool(dirty), "torch": str(torch.__version__),
            "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- main

METRIC_CURVES = ("dynamic_label_acc", "guide_clean_acc", "target_clean_acc", "target_pgd_acc")
RESUME_KEYS = {"target", "guide", "optimizer", "scaler", "epoch", "step", "partial", "best_val", "args"}
# What a resumed run takes from its command line; every other flag comes from the run's args.
RESUME_ALWAYS = ("resume", "out_dir", "overwrite")
RESUME_MAY_CHANGE = RESUME_ALWAYS + ("device", "workers", "data_dir", "eval_every", "eval_pgd_n", "compile",
                                     "deterministic")
RESUME_REASONS = {
    "epochs": "the lr milestones sit at 75 % and 90 % of --epochs, so another value re-times epochs already trained",
    "seed": "the remaining steps' data order, augmentation and attack starts are drawn from it",
    "batch_size": "the position saved in last.pt is a batch of the order drawn for that size",
    "dataset": "the position saved in last.pt indexes that training set",
    "train_size": "the position saved in last.pt indexes that training set",
    "val_size": "the position saved in last.pt indexes that training set",
    "target": "last.pt holds weights of that architecture",
    "guide": "last.pt holds weights of that architecture",
    "guide_warmup": "the epochs of the lr schedule and of the variants' switches are counted after it",
}


def resume_conflicts(args, stored, given):
    """The flags given with --resume that would change the run (one reason each), for the refusal."""
    defaults = vars(get_parser().parse_args([]))
    for name in sorted(set(given) - set(RESUME_MAY_CHANGE)):
        old, new = stored.get(name, defaults.get(name)), getattr(args, name)
        if new != old:
            why = RESUME_REASONS.get(name, "the rest of the run would train another method than its first part did")
            yield f"--{name.replace('_', '-')} {new} (the run has {old}: {why})"


def resolve_resume(args, given=()):
    """--resume DIR: (the arguments the run was started with, DIR/last.pt's contents or None).
    `given` names the flags on the command line: those that would change the run are refused."""
    run_dir = args.resume
    last, saved = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "args.json")
    if not os.path.isdir(run_dir):
        raise UsageError(f"--resume {run_dir}: no such directory")
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
    conflicts = list(resume_conflicts(args, stored, given))
    if conflicts:
        raise UsageError(f"--resume {run_dir} continues the run with the flags it was started with; "
                         f"refused: {'; '.join(conflicts)}")
    args.out_dir = run_dir
    resumed = argparse.Namespace(**{**vars(get_parser().parse_args([])), **stored})
    for key in RESUME_MAY_CHANGE:
        if key in RESUME_ALWAYS or key in given:
            setattr(resumed, key, getattr(args, key))
    return resumed, ckpt


def given_flags(argv):
    """The destinations of the flags actually written on the command line (not their defaults)."""
    parser = get_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def run_title(args):
    """dataset, target/guide and variant, for curves.png's title."""
    variant = ["DYNAT" if args.labels == "dynamic" else {"true": "PGD-AT (true labels)", "lbgat": "LBGAT"}[args.labels]]
    variant += ["Inner"] * args.inner + ["AWP"] * args.awp + [args.reweight.upper()] * (args.reweight != "none")
    extra = [f"α={args.alpha:g}"] * (args.alpha > 0) + [f"β={args.beta:g}"] * (args.beta != 1)
    extra += [f"guide warm-up {args.guide_warmup}"] * (args.guide_warmup > 0)
    models = args.target + (f" target / {args.guide} guide" if args.labels != "true" else "")
    return f"{args.dataset}: {models}, {'-'.join(variant)}" + (f" ({', '.join(extra)})" if extra else "")


def plot_curves(rows, path, args):
    """curves.png: accuracies (top) and losses with the learning rate (bottom) per epoch, with the
    epoch of a collapse warning marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (acc, loss) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, height_ratios=[3, 2])
    for key in METRIC_CURVES:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            acc.plot(*zip(*pts), marker="o", label=key)
    for r in rows:
        if r.get("warning"):
            for ax in (acc, loss):
                ax.axvline(r["epoch"], color="red", linestyle="--", alpha=0.6)
            acc.annotate("target collapse warning", (r["epoch"], 0.97), color="red", fontsize=8, ha="right",
                         rotation=90, va="top")
    note = "\nsynthetic data: random images and labels, the accuracies mean nothing" * (args.dataset == "synthetic")
    acc.set_title(run_title(args) + note, fontsize=9)
    acc.set_ylabel("accuracy")
    acc.set_ylim(0, 1)
    if acc.get_legend_handles_labels()[0]:  # no accuracy yet before the first evaluated epoch
        acc.legend(fontsize=8)
    acc.grid(alpha=0.3)
    for key in ("loss_guide", "loss_target"):
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            loss.plot(*zip(*pts), marker=".", label=key)
    loss.set_ylabel("training loss (epoch mean)")
    loss.set_xlabel("epoch")
    loss.grid(alpha=0.3)
    lr = loss.twinx()
    lr.step([r["epoch"] for r in rows], [r["lr"] for r in rows], where="mid", color="grey", label="lr")
    lr.set_ylabel("learning rate", color="grey")
    lines = loss.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    loss.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper right")
    loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Trainer:
    """One training run's state, built once from its arguments: processes, the data on the device,
    both models, the optimizer, its paths and where it resumes. The loop functions take it whole."""

    def __init__(self, args, ckpt=None):
        self.args = args
        self.rank, self.world, self.device = init_processes(args.device)
        self.main_process = self.rank == 0
        if args.batch_size < self.world:
            raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must be >= the {self.world} processes")
        out = args.out_dir
        self.last_path, self.best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        if not args.resume and os.path.isdir(out) and os.listdir(out):
            if not args.overwrite:
                raise UsageError(f"--out-dir {out} is not empty: pass --resume {out} to continue it or --overwrite")
            if self.main_process:  # a stale best.pt of the old run must not pass for this run's
                for path in (self.last_path, self.best_path):
                    if os.path.isfile(path):
                        os.remove(path)
        configure_backends(args.deterministic)
        self.amp, self.channels_last = amp_dtype(args.amp, self.device), args.channels_last
        if args.amp == "auto":  # recorded as resolved: a resume on another device keeps the run's precision
            args.amp = {None: "none", torch.bfloat16: "bf16"}[self.amp]
        # One shape for every evaluation forward where shapes cost: cuDNN autotuning, compiled graphs.
        self.fixed_shapes = self.device.type == "cuda" or args.compile
        self.load_data()
        self.build_models()
        self.start_epoch, self.sums, self.best_val = 1, new_epoch_sums(), -1.0
        self.provenance = provenance()  # the code this run starts with, recorded in every checkpoint
        if ckpt is not None:
            self.restore(ckpt)
        self.warned = False

    def log(self, *a):
        if self.main_process:
            print(*a, flush=True)

    def load_data(self):
        """The dataset as uint8 tensors on the device; --train-size and --val-size applied."""
        args = self.args
        data = load_in_turns(self.rank, self.world, lambda: load_data(args.dataset, args.data_dir, args.workers))
        data["train"] = class_balanced_subset(data["train"], args.train_size, data["classes"])
        (images, labels), data["val"] = split_validation(data["train"], args.val_size, args.seed)
        if len(labels) == 0 or len(data["test"][1]) == 0:
            raise UsageError(f"{args.dataset} at {args.data_dir}: no images in the training or test split")
        if args.dataset == "synthetic":
            self.log("synthetic data: random images and labels; every accuracy below means nothing")
        self.images, self.labels = images.to(self.device), labels.to(self.device)  # uint8 N x 3 x H x W, int64 N
        self.data, self.classes = data, data["classes"]

    def build_models(self):
        """Target, guide (none with --labels true), one SGD over both (Eq. 6) and fp16's GradScaler."""
        args, device = self.args, self.device
        torch.manual_seed(args.seed)  # identical initial weights on every process
        target = build_model(args.target, self.classes).to(device)
        guide = build_model(args.guide, self.classes).to(device) if args.labels != "true" else None
        models = [m for m in (target, guide) if m is not None]
        if args.sync_bn and self.world > 1:
            models = [synchronise_batchnorm(m) for m in models]
        for m in models:
            m.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.target, self.guide, self.models = models[0], (models[1] if guide is not None else None), models
        self.optimizer = torch.optim.SGD([p for m in models for p in m.parameters()], lr=args.lr,
                                         momentum=args.momentum, weight_decay=args.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        if args.compile:  # after the weights are final: nn.Module.compile keeps the state_dict keys plain
            for m in models:
                m.compile()

    def restore(self, ckpt):
        """Continue from last.pt: weights, optimizer, scaler, epoch, the position and sums mid-epoch."""
        load_weights(self.target, ckpt["target"], f"{self.last_path} [target]", self.log)
        if self.guide is not None:
            load_weights(self.guide, ckpt["guide"], f"{self.last_path} [guide]", self.log)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.best_val = ckpt["epoch"] + 1, ckpt["best_val"]
        self.sums = {**new_epoch_sums(), **(ckpt["partial"] or {}), "step": ckpt["step"]}
        if ckpt.get("world", self.world) != self.world:  # allowed (the global batch is the same), but said
            self.log(f"note: resumed on {self.world} process(es), the run started on {ckpt['world']}: the attack's "
                     "random starts (one seed per process) differ from an uninterrupted run's, and so do what each "
                     "process computes over its share of the batch (GAIRAT/MAIL/ISEAT weights; BatchNorm's batch "
                     "statistics unless --sync-bn)")

    def checkpoint(self, epoch_done, sums=None):
        """last.pt (rank 0): everything a resume needs; mid-epoch, `sums` holds the position."""
        if self.main_process:
            save_atomic({**self.weights(), "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                         "epoch": epoch_done, "step": int(sums["step"]) if sums else 0, "partial": sums,
                         "best_val": self.best_val, "world": self.world}, self.last_path)

    def weights(self):
        """What every checkpoint holds: plain state_dicts plus what rebuilds the models, and provenance."""
        return {"target": self.target.state_dict(), "classes": self.classes, "args": vars(self.args),
                "guide": self.guide.state_dict() if self.guide is not None else None, "provenance": self.provenance}

    def start_files(self):
        """args.json, and metrics.jsonl cut back to the epochs before the one we start at."""
        if not self.main_process:
            return
        os.makedirs(self.args.out_dir, exist_ok=True)
        with open(os.path.join(self.args.out_dir, "args.json"), "w") as f:
            json.dump(vars(self.args), f, indent=1)
        rows = []
        if os.path.isfile(self.metrics_path):
            with open(self.metrics_path) as f:
                rows = [r for r in map(json.loads, f) if r["epoch"] < self.start_epoch]
        with open(self.metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        self.warned = any(r.get("warning") for r in rows)


def end_epoch(trainer, epoch, sums):
    """The epoch's metrics row (training sums, evaluation on rank 0, a collapse warning at most once
    per run), appended to metrics.jsonl and curves.png, then last.pt and best.pt."""
    args, guide = trainer.args, trainer.guide
    n_steps = max(sums["step"], 1)
    paper_epoch, lr = paper_epoch_and_lr(args, epoch)
    row = {"epoch": epoch, "lr": lr, "seconds": round(sums["seconds"], 3), "target_trained": paper_epoch > 0,
           "loss_guide": sums["loss_guide"] / n_steps if guide is not None else None,
           "loss_target": sums["loss_target"] / n_steps if paper_epoch > 0 else None,
           "dynamic_label_acc": sums["dyn_correct"] / sums["seen"] if guide is not None else None}
    if trainer.main_process and (epoch % args.eval_every == 0 or epoch == last_epoch(args)):
        row.update(evaluate_epoch(trainer, epoch))
    else:
        row.update(dict.fromkeys(("guide_clean_acc", "target_clean_acc", "guide_pred_classes",
                                  "target_pred_classes", "target_pgd_acc", "pgd_split", "pgd_n")))
    row["warning"] = None if trainer.warned else collapse_warning(row, trainer.classes, first_free_epoch(args),
                                                                  math.ceil(len(trainer.labels) / args.batch_size),
                                                                  args.guide_warmup)
    trainer.warned = trainer.warned or row["warning"] is not None
    improved = trainer.data["val"] is not None and row["target_pgd_acc"] is not None and row["target_pgd_acc"] >= trainer.best_val
    if improved:
        trainer.best_val = row["target_pgd_acc"]
    if trainer.main_process:
        with open(trainer.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(trainer.metrics_path) as f:
            plot_curves([json.loads(line) for line in f], os.path.join(args.out_dir, "curves.png"), args)
        trainer.checkpoint(epoch)
        if improved:
            save_atomic({**trainer.weights(), "epoch": epoch, "val_pgd_acc": trainer.best_val}, trainer.best_path)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"
        evaluated = "" if row["pgd_n"] is None else (
            f" | clean guide {fmt(row['guide_clean_acc'])} target {fmt(row['target_clean_acc'])} | PGD-10 "
            f"{fmt(row['target_pgd_acc'])} ({row['pgd_split']}, n={row['pgd_n']})")
        trainer.log(f"epoch {epoch:3d} lr {row['lr']:.4f} {row['seconds']:.1f}s | loss guide {fmt(row['loss_guide'])} "
                    f"target {fmt(row['loss_target'])} | dyn-label acc {fmt(row['dynamic_label_acc'])}{evaluated}")
        if row["warning"]:
            print(row["warning"], file=sys.stderr, flush=True)
    if trainer.world > 1:
        check_replicas(trainer.models)
        dist.barrier()  # the others wait while rank 0 evaluates and writes


def run(args, given=()):
    """Train: --guide-warmup epochs of the guide alone (none by default), then Algorithm 1 for --epochs
    epochs, one checkpoint per epoch. Returns the exit code."""
    ckpt = None
    if args.resume:
        args, ckpt = resolve_resume(args, given)
    validate_args(args)
    trainer = Trainer(args, ckpt)
    last = last_epoch(args)
    if trainer.start_epoch > last:
        trainer.log(f"{args.out_dir} already finished its {last} epoch{'s' * (last != 1)}: nothing to do")
        return 0
    trainer.start_files()
    if ckpt is not None:
        trainer.log(f"resumed {args.out_dir} at epoch {trainer.start_epoch}, batch {int(trainer.sums['step'])}")
    del ckpt  # free the host copy of the weights and the optimizer state
    trainer.log(f"training {args.target} (target) with {args.guide if trainer.guide is not None else 'no'} guide on "
                f"{args.dataset} ({len(trainer.labels)} train images, {trainer.classes} classes), {trainer.world} "
                f"process(es) on {trainer.device}, amp={trainer.amp}, channels_last={trainer.channels_last}")
    with GracefulStop() as stop:
        for epoch in range(trainer.start_epoch, last + 1):  # --guide-warmup's epochs, then --epochs
            sums, trainer.sums = trainer.sums, new_epoch_sums()
            signum = train_epoch(trainer, epoch, sums, stop)
            if signum:
                trainer.checkpoint(epoch - 1, sums)
                trainer.log(f"interrupted by {signal.Signals(signum).name} at epoch {epoch}, batch {int(sums['step'])}: "
                            f"saved {trainer.last_path}; continue with: python dynat.py --resume {args.out_dir}")
                return 128 + signum
            end_epoch(trainer, epoch, sums)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(get_parser().parse_args(argv), given_flags(argv))
    except UsageError as e:
        print(f"dynat.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"dynat.py: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dynat.py: stopped at once by a second signal; last.pt holds the last saved state", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
