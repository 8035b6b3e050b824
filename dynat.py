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
Last measured result: none of the paper's rows has been run with this code yet; see the
README ("Reproducing the paper") for what has been measured and on what.
"""
import argparse
import contextlib
import json
import math
import os
import pickle
import signal
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
    require(args, ("num_steps", "val_size", "workers", "awp_warmup", "train_size"), lambda v: v >= 0, ">= 0")
    require(args, ("lr", "momentum", "weight_decay", "alpha", "beta", "awp_gamma", "iseat"),
            lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
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


def train_batch(x_train, y_train, idx, device, channels_last=False):
    """Training batch `idx` of the uint8 dataset: [0, 1] floats on `device`, augmented."""
    x = augment(to_input(x_train[idx], device))
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y_train[idx]


def epoch_batches(n, batch_size, seed, epoch):
    """The epoch's shuffled index batches: a pure function of (seed, epoch), so a resumed run
    sees exactly the order the interrupted one would have seen."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm.split(batch_size)


def step_seed(seed, epoch, step, rank):
    """Seed for one step's randomness (augmentation, attack start): exact resume at any batch."""
    return (((seed * 100_003 + epoch) * 1_000_003 + step) * 1_009 + rank) % (2 ** 63)


# ----------------------------------------------------------------------------- precision

def amp_dtype(amp, device):
    """Autocast dtype for --amp (None = float32)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


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
    The model runs in eval mode with its parameters frozen (only the input gradient is needed);
    both are restored on return. Returns (x_adv, kappa) with kappa[i] = number of iterates, checked
    before each update, that the model still classified as y[i] (GAIRAT's geometry value).
    """
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
                label_smoothing=0.0, weight_fn=None, weights_delta=None, amp=None):
    """The target's terms of Eq. 6: beta * L_t(f_t(x'), y_dyn) (Eq. 5) + alpha * KL_batchmean(p(f_t(x)) || p(f_t(x'))).

    labels="lbgat" replaces CE by LBGAT's MSE(f_t(x'), f_g(x)) (gradient into the guide).
    weight_fn(logits_adv) -> per-example weights (GAIRAT/MAIL) or None.
    weights_delta: {param name: delta}; the forwards use w + delta (AWP) without touching w.
    Returns (loss, logits_adv).
    """
    params = None
    if weights_delta:
        params = {n: p + weights_delta[n] for n, p in target.named_parameters() if n in weights_delta}
    forward = (lambda inp: functional_call(target, params, (inp,))) if params else target
    with autocast(x.device, amp):
        logits_adv = forward(x_adv).float()
        logits_nat = forward(x).float() if alpha > 0 else None
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
               mail_slope=10.0, awp_gamma=0.0, iseat=0.0, amp=None, loss_scale=None, average=None):
    """Algorithm 1 for one batch: returns (loss, stats) with loss = L_g + beta L_t [+ variants] (Eq. 6).

    No hidden side effects: grads are not zeroed, nothing is stepped, both models are left in
    the mode they came in (train), the target's weights are never modified (AWP evaluates at
    w + delta functionally). `awp_gamma` 0 / `iseat` 0 / reweight "none" switch those parts off.
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

    # Eq. 5: the target learns the dynamic labels on x' (at w + delta under AWP).
    loss_target, logits_adv = target_loss(target, x, x_adv, y_train, weights_delta=delta, **terms)
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


def to_input(x_uint8, device, channels_last=False):
    """uint8 images -> float [0, 1] on `device` (the models see unnormalised pixels)."""
    x = x_uint8.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def correct_mask(model, x, y, *, device, batch_size=256, attack=None, amp=None, channels_last=False,
                 progress=None):
    """Per-example correctness (bool, on CPU) of `model` on uint8 images x, clean when `attack` is
    None, else under perturb(**attack). The model is evaluated in eval mode and left as it came."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = to_input(x[i:i + batch_size], device, channels_last), y[i:i + batch_size].to(device)
            if attack is not None:
                xb, _ = perturb(model, xb, yb, amp=amp, **attack)
            with torch.no_grad(), autocast(device, amp):
                out.append((model(xb).argmax(1) == yb).cpu())
            if progress is not None:
                progress.update(len(yb))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def robust_mask(model, x, y, attack, *, clean=None, restarts=1, progress=None, **common):
    """Per-example robustness under perturb(**attack): correct clean and after each of `restarts`
    random starts (each restart attacks only the points still robust). `clean` reuses a clean
    correct_mask; `progress` (tqdm) grows by the points each restart attacks."""
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
                iseat=args.iseat if late else 0.0)


def optimizer_step(loss, optimizer, scaler, models, world=1, sync_buffers=True):
    """Eq. 6's joint minimisation: backward, average across processes, one SGD step of both models."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if world > 1:
        sync_replicas(models, world, grads=True, buffers=sync_buffers)
    scaler.step(optimizer)
    scaler.update()


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


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with the statistics of the global batch across processes, for CPU/gloo
    (torch's SyncBatchNorm runs on GPUs only). Moments are summed by an autograd-aware
    all-reduce, so the gradient is that of the one-process batch."""

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        xf, c = x.float(), x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=torch.float32)
        sums = all_reduce(torch.cat([xf.sum((0, 2, 3)), xf.pow(2).sum((0, 2, 3)), count]))
        n = sums[-1]
        mean = sums[:c] / n
        var = sums[c:2 * c] / n - mean.pow(2)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (xf - mean.view(1, c, 1, 1)) * scale.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def synchronise_batchnorm(model, device):
    """--sync-bn: torch's SyncBatchNorm on CUDA, GlobalBatchNorm2d on CPU (same state_dict keys)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            bn = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            synchronise_batchnorm(child, device)
    return model


# ----------------------------------------------------------------------------- main

METRIC_CURVES = ("dynamic_label_acc", "guide_clean_acc", "target_clean_acc", "target_pgd_acc")
RESUME_KEYS = {"target", "guide", "optimizer", "scaler", "epoch", "step", "partial", "best_val", "args"}
RESUME_OVERRIDES = ("resume", "device", "workers", "out_dir", "overwrite")


def resolve_resume(args):
    """--resume DIR: (the arguments the run was started with, DIR/last.pt's contents or None)."""
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
    args.out_dir = run_dir
    resumed = argparse.Namespace(**{**vars(get_parser().parse_args([])), **stored})
    for key in RESUME_OVERRIDES:
        setattr(resumed, key, getattr(args, key))
    return resumed, ckpt


def plot_curves(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in METRIC_CURVES:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_epoch(target, guide, data, args, device, amp, channels_last):
    """Per-epoch figures: clean accuracy of both models on the test set, PGD-10 of the target
    on the validation split when there is one (else the first --eval-pgd-n test images)."""
    (x_test, y_test), val = data["test"], data["val"]
    limit = args.batch_size if args.dry_run else None
    common = dict(device=device, batch_size=max(args.batch_size, 256), amp=amp, channels_last=channels_last)
    acc = lambda model, x, y, **kw: correct_mask(model, x[:limit], y[:limit], **common, **kw).float().mean().item()
    x_pgd, y_pgd = val if val is not None else (x_test, y_test)
    n = min(args.eval_pgd_n, len(y_pgd), limit or len(y_pgd))
    pgd10 = dict(epsilon=args.epsilon, step_size=args.step_size, num_steps=10, loss="ce", start="uniform")
    return {"guide_clean_acc": acc(guide, x_test, y_test) if guide is not None else None,
            "target_clean_acc": acc(target, x_test, y_test),
            "target_pgd_acc": robust_mask(target, x_pgd[:n], y_pgd[:n], pgd10, **common).float().mean().item(),
            "pgd_split": "val" if val is not None else "test", "pgd_n": n}


def run(args):
    from tqdm import tqdm

    ckpt = None
    if args.resume:
        args, ckpt = resolve_resume(args)
    validate_args(args)
    rank, world, device = init_processes(args.device)
    main_process = rank == 0
    log = (lambda *a: print(*a, flush=True)) if main_process else (lambda *a: None)
    if args.batch_size < world:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must be >= the {world} processes")
    out = args.out_dir
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    metrics_path = os.path.join(out, "metrics.jsonl")
    if not args.resume and os.path.isdir(out) and os.listdir(out):
        if not args.overwrite:
            raise UsageError(f"--out-dir {out} is not empty: pass --resume {out} to continue it or --overwrite")
        if main_process:  # a stale best.pt of the old run must not pass for this run's
            for path in (last_path, best_path):
                if os.path.isfile(path):
                    os.remove(path)

    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = amp_dtype(args.amp, device)
    channels_last = args.channels_last

    # Under torchrun, each node's first process loads (and downloads) before the others read.
    first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if world > 1 and not first_on_node:
        dist.barrier()
    data = load_data(args.dataset, args.data_dir, args.workers)
    if world > 1 and first_on_node:
        dist.barrier()
    data["train"] = class_balanced_subset(data["train"], args.train_size, data["classes"])
    (x_train, y_train), data["val"] = split_validation(data["train"], args.val_size, args.seed)
    if len(y_train) == 0 or len(data["test"][1]) == 0:
        raise UsageError(f"{args.dataset} at {args.data_dir}: no images in the training or test split")
    if args.dataset == "synthetic":
        log("synthetic data: random images and labels; every accuracy below means nothing")
    x_train, y_train = x_train.to(device), y_train.to(device)
    classes = data["classes"]

    torch.manual_seed(args.seed)  # identical initial weights on every process
    target = build_model(args.target, classes).to(device)
    guide = build_model(args.guide, classes).to(device) if args.labels != "true" else None
    models = [m for m in (target, guide) if m is not None]
    if args.sync_bn and world > 1:
        models = [synchronise_batchnorm(m, device) for m in models]
        target, guide = models[0], (models[1] if guide is not None else None)
    for m in models:
        m.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD([p for m in models for p in m.parameters()], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    start_epoch, start_step, partial, best_val = 1, 0, None, -1.0
    if ckpt is not None:
        load_weights(target, ckpt["target"], f"{last_path} [target]", log)
        if guide is not None:
            load_weights(guide, ckpt["guide"], f"{last_path} [guide]", log)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step = ckpt["epoch"] + 1, ckpt["step"]
        partial, best_val = ckpt["partial"], ckpt["best_val"]
        ckpt = None  # free the host copy of weights and optimizer state
        log(f"resumed {out} at epoch {start_epoch}, batch {start_step}")
    if main_process:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        rows = []
        if os.path.isfile(metrics_path):  # drop epochs written after the checkpoint we resume from
            with open(metrics_path) as f:
                rows = [r for r in map(json.loads, f) if r["epoch"] < start_epoch]
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.compile:
        for m in models:
            m.compile()
    average = (lambda ts: all_mean(ts, world)) if world > 1 else None

    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        stop["signal"] = signum

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)

    def weights():  # what every checkpoint holds: plain state_dicts plus what rebuilds the models
        return {"target": target.state_dict(), "guide": guide.state_dict() if guide is not None else None,
                "classes": classes, "args": vars(args)}

    def checkpoint(epoch_done, step, partial_sums):
        if main_process:
            save_atomic({**weights(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch_done, "step": step, "partial": partial_sums, "best_val": best_val,
                         "rng": {"torch": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}},
                        last_path)

    log(f"training {args.target} (target) with {args.guide if guide is not None else 'no'} guide on "
        f"{args.dataset} ({len(y_train)} train images, {classes} classes), {world} process(es) on {device}, "
        f"amp={amp}, channels_last={channels_last}")
    for epoch in range(start_epoch, args.epochs + 1):
        lr = learning_rate(epoch, args.lr, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        settings = loss_settings(args, epoch)
        batches = epoch_batches(len(y_train), args.batch_size, args.seed, epoch)[:1 if args.dry_run else None]
        if len(batches[-1]) < world:  # a last batch too small to give every process an image
            batches = batches[:-1]
        sums = partial or {"loss_guide": 0.0, "loss_target": 0.0, "dyn_correct": 0.0, "seen": 0.0, "seconds": 0.0}
        partial = None
        bar = tqdm(total=len(batches), initial=start_step, desc=f"epoch {epoch}", disable=not main_process,
                   leave=False, mininterval=1.0, dynamic_ncols=True)
        t0 = time.time()
        for step in range(start_step, len(batches)):
            idx = batches[step].to(device)
            # The global batch is augmented identically on every process, then split, so N
            # processes see exactly the images one process would; the attack's random start
            # then draws from a per-process seed.
            torch.manual_seed(step_seed(args.seed, epoch, step, 0))
            x, y = train_batch(x_train, y_train, idx, device, channels_last)
            share = 1.0
            if world > 1:
                x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
                torch.manual_seed(step_seed(args.seed, epoch, step, rank))
                # Unequal shares: weight each process's mean so the average is the global batch's mean.
                share = len(y) * world / len(idx)
            loss, stats = dynat_loss(target, guide, x, y, **settings, amp=amp, loss_scale=scaler.scale,
                                     average=average)
            names = ["loss_guide", "loss_target"] + (["loss_iseat"] if "loss_iseat" in stats else [])
            values = torch.stack([stats[k].float() * share for k in names]
                                 + [stats.get("dyn_correct", y.new_zeros(())).float(), y.new_tensor(len(y)).float()])
            optimizer_step(loss * share, optimizer, scaler, models, world, sync_buffers=not args.sync_bn)
            if world > 1:
                dist.all_reduce(values)  # sums over processes (losses are averaged below)
            # The step's one host sync, after the update is queued so a GPU never waits on it. A
            # non-finite loss stops the run before anything is saved: last.pt stays the last good state.
            values = values.tolist()
            for name, v in zip(names, values):
                if not math.isfinite(v):
                    raise NonFiniteLoss(f"{name} is {v} at epoch {epoch}, batch {step + 1}; "
                                        f"{last_path} holds the last good state")
            sums["loss_guide"] += values[0] / world
            sums["loss_target"] += values[1] / world
            sums["dyn_correct"] += values[-2]
            sums["seen"] += values[-1]
            bar.update(1)
            bar.set_postfix(loss=f"{(values[0] + values[1]) / world:.3f}",
                            dyn_acc=f"{sums['dyn_correct'] / sums['seen']:.3f}")
            # On the device only for NCCL, which reduces device tensors only: no extra copy otherwise.
            flag = torch.tensor([stop["signal"] or 0], device=device if world > 1 else "cpu")
            if world > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every process stops at the same batch
            if flag.item():
                bar.close()
                sums["seconds"] += time.time() - t0
                checkpoint(epoch - 1, step + 1, sums)
                name = signal.Signals(flag.item()).name
                log(f"interrupted by {name} at epoch {epoch}, batch {step + 1}: saved {last_path}; "
                    f"continue with: python dynat.py --resume {out}")
                return 128 + flag.item()
        bar.close()
        start_step = 0
        sums["seconds"] += time.time() - t0
        n_batches = len(batches)
        row = {"epoch": epoch, "lr": lr, "seconds": round(sums["seconds"], 3),
               "loss_guide": sums["loss_guide"] / n_batches if guide is not None else None,
               "loss_target": sums["loss_target"] / n_batches,
               "dynamic_label_acc": sums["dyn_correct"] / sums["seen"] if guide is not None else None}
        if main_process and (epoch % args.eval_every == 0 or epoch == args.epochs):
            row.update(evaluate_epoch(target, guide, data, args, device, amp, channels_last))
        else:
            row.update(dict.fromkeys(("guide_clean_acc", "target_clean_acc", "target_pgd_acc",
                                      "pgd_split", "pgd_n")))
        improved = data["val"] is not None and row["target_pgd_acc"] is not None and row["target_pgd_acc"] >= best_val
        if improved:
            best_val = row["target_pgd_acc"]
        if main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            with open(metrics_path) as f:
                plot_curves([json.loads(line) for line in f], os.path.join(out, "curves.png"))
            checkpoint(epoch, 0, None)
            if improved:
                save_atomic({**weights(), "epoch": epoch, "val_pgd_acc": best_val}, best_path)
            fmt = lambda v: "-" if v is None else f"{v:.4f}"
            log(f"epoch {epoch:3d} lr {lr:.4f} {row['seconds']:.1f}s | loss guide {fmt(row['loss_guide'])} "
                f"target {fmt(row['loss_target'])} | dyn-label acc {fmt(row['dynamic_label_acc'])} | clean guide "
                f"{fmt(row['guide_clean_acc'])} target {fmt(row['target_clean_acc'])} | PGD-10 "
                f"{fmt(row['target_pgd_acc'])} ({row['pgd_split']}, n={row['pgd_n']})")
        if world > 1:
            check_replicas(models)
            dist.barrier()  # the others wait while rank 0 evaluates and writes
    return 0


def main(argv=None):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # run() installs its own
    try:
        return run(get_parser().parse_args(argv))
    except UsageError as e:
        print(f"dynat.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"dynat.py: stopped: {e}", file=sys.stderr)
        return 1
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
