"""Models of the DYNAT paper: CIFAR ResNet-18 and WideResNet-D-K, and their state_dicts.

Both take [0, 1] pixels (no normalisation layer, as the paper's models) of any size
(adaptive pooling) and any number of classes. `build_model(name, num_classes)` is the
one entry point; `load_state` loads a checkpoint strictly, after `remap_state_dict` has
said, key by key, how one written by another codebase maps onto ours. Replicas of a model across
torchrun's processes: `GlobalBatchNorm2d` (the global batch's BatchNorm, dynat.py --sync-bn),
`average_replicas` (data parallelism by hand) and `check_replicas`. Checkpoints: `seal` before the write,
`load_checkpoint` checks the SHA-256 of the contents that `seal` wrote into them.
"""
import hashlib
import os
import pickle
import re
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016), post-activation."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, four stages of two blocks with strides 1, 2, 2, 2.

    (The LBGAT/DYNAT release's "ResNet18_cifar" uses strides 1, 1, 2, 2: about 3x the
    compute for the same parameters; see README, implementation details.)
    """

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride),
                                        BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    """WRN pre-activation block (Zagoruyko & Komodakis 2016), as in the TRADES code."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == planes
        # camelCase as in the TRADES/AWP/LBGAT code, so their checkpoints' keys match ours
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        # The shortcut of a width-changing block starts from the activated input (TRADES WRN).
        shortcut = x if self.equal_in_out else self.convShortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WideResNet-depth-widen: three groups of (depth - 4) / 6 blocks, widths 16k, 32k, 64k.

    Key names follow the TRADES/AWP/LBGAT code (block1.layer.0.conv1.weight, ...) so their
    checkpoints load, minus the unused `sub_block1` that code builds and never calls.
    """

    def __init__(self, depth=34, widen_factor=10, num_classes=10):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)

        def group(in_planes, planes, stride):
            blocks = [WideBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(n)]
            g = nn.Module()
            g.layer = nn.Sequential(*blocks)
            return g

        self.block1 = group(widths[0], widths[1], 1)
        self.block2 = group(widths[1], widths[2], 2)
        self.block3 = group(widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # the TRADES WRN initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3.layer(self.block2.layer(self.block1.layer(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


ARCH_HELP = "resnet18 or wrn-D-K (WideResNet depth D = 6n+4, widen factor K), e.g. wrn-34-10, wrn-16-2"


def check_arch(name):
    """Raise ValueError with a one-line reason unless `name` names a model we can build."""
    if name == "resnet18":
        return
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if not m:
        raise ValueError(f"unknown architecture {name!r}: expected {ARCH_HELP}")
    depth, width = int(m.group(1)), int(m.group(2))
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"invalid WideResNet depth in {name!r}: depth must be 6n+4 (10, 16, 22, 28, 34, ...)")
    if width < 1:
        raise ValueError(f"invalid WideResNet widen factor in {name!r}: must be >= 1")


def build_model(name, num_classes=10):
    """Map an architecture name (`resnet18`, `wrn-D-K`) to a freshly initialised model."""
    check_arch(name)
    if name == "resnet18":
        return ResNet18(num_classes)
    depth, width = map(int, name.split("-")[1:])
    return WideResNet(depth, width, num_classes)


def remap_state_dict(state_dict):
    """Map a checkpoint from another codebase onto our key names, explicitly.

    Returns (new_state_dict, notes); every note says what was renamed or dropped:
    `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes are stripped,
    the TRADES WRN's never-used `sub_block1.*` keys are dropped. Anything else must then
    match the architecture exactly (the caller loads with strict=True).
    """
    notes, out = [], {}
    for prefix in ("module.", "_orig_mod."):
        if any(k.startswith(prefix) for k in state_dict):
            notes.append(f"stripped prefix {prefix!r}")
    dropped = 0
    for key, value in state_dict.items():
        new = key
        while new.startswith(("module.", "_orig_mod.")):
            new = new.split(".", 1)[1]
        if new.startswith("sub_block1."):
            dropped += 1
            continue
        out[new] = value
    if dropped:
        notes.append(f"dropped {dropped} unused TRADES 'sub_block1.*' keys")
    return out, notes


def contents_sha256(obj):
    """SHA-256 of a checkpoint's contents, in order: each tensor's dtype, shape and bytes, each other value's repr."""
    h = hashlib.sha256()

    def walk(o):
        if torch.is_tensor(o):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)}".encode())
            h.update(t.view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(b"{")
            for k, v in o.items():
                h.update(repr(k).encode())
                walk(v)
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())
    walk(obj)
    return h.hexdigest()


def first_nonfinite(obj, name=""):
    """The name ("target.bn1.running_var") of the first floating tensor in obj holding inf or nan, else None."""
    if torch.is_tensor(obj):
        return name if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return next((n for k, v in items if (n := first_nonfinite(v, f"{name}.{k}" if name else str(k)))), None)


def seal(ckpt):
    """The checkpoint dict to write: tensors copied to the CPU once, refused (ValueError) if any holds inf or nan,
    and the SHA-256 of the contents under "sha256", which load_checkpoint checks."""
    to_cpu = lambda o: (o.detach().cpu() if torch.is_tensor(o) else {k: to_cpu(v) for k, v in o.items()}
                        if isinstance(o, dict) else type(o)(map(to_cpu, o)) if isinstance(o, (list, tuple)) else o)
    ckpt = to_cpu(ckpt)
    bad = first_nonfinite(ckpt)
    if bad:
        raise ValueError(f"{bad} holds inf or nan")
    return {**ckpt, "sha256": contents_sha256(ckpt)}


def load_checkpoint(path):
    """torch.load(weights_only=True) with one-line errors: nothing in the file is ever executed; a checkpoint
    that seal wrote must match its SHA-256 (bytes changed on the disk or in a copy load, but differently)."""
    if not os.path.isfile(path):
        if not os.path.isdir(path):
            raise ValueError(f"{path}: no such checkpoint file")
        found = [os.path.join(path, n) for n in ("last.pt", "best.pt") if os.path.isfile(os.path.join(path, n))]
        raise ValueError(f"{path}: a directory, not a checkpoint" + (f": pass {' or '.join(found)}" if found else
                                                                     " (it holds no last.pt or best.pt)"))
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a legacy pickle
        raise ValueError(f"{path}: not a checkpoint (torch.save writes a zip archive or a pickle; this file "
                         f"starts with {head!r}): pass a last.pt / best.pt or a saved state_dict")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused: it holds objects that need arbitrary code to unpickle "
                         "(only tensors and plain containers are loaded)")
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: truncated or corrupt checkpoint ({(str(e).strip().splitlines() or [type(e).__name__])[0]})")
    if isinstance(ckpt, dict) and "sha256" in ckpt:
        written = ckpt.pop("sha256")
        if contents_sha256(ckpt) != written:
            raise ValueError(f"{path}: corrupt: its contents do not match the SHA-256 written with them")
    return ckpt


def load_state(model, state_dict):
    """Load a state_dict strictly after remap_state_dict; returns its notes. A key or shape that does not
    match the architecture raises ValueError with a one-line reason (never a silent partial load)."""
    if not isinstance(state_dict, dict):
        raise ValueError("not a state_dict")
    state_dict, notes = remap_state_dict(state_dict)
    own = model.state_dict()
    missing, extra = [k for k in own if k not in state_dict], [k for k in state_dict if k not in own]
    if missing or extra:
        raise ValueError(f"keys do not match the architecture: {len(missing)} missing"
                         f"{' (' + missing[0] + ', ...)' if missing else ''}, {len(extra)} unexpected"
                         f"{' (' + extra[0] + ', ...)' if extra else ''}")
    for k, v in own.items():
        if not torch.is_tensor(state_dict[k]) or state_dict[k].shape != v.shape:
            shape = tuple(state_dict[k].shape) if torch.is_tensor(state_dict[k]) else type(state_dict[k]).__name__
            raise ValueError(f"{k} has shape {shape}, the architecture needs {tuple(v.shape)} "
                             "(another architecture or class count?)")
    model.load_state_dict(state_dict, strict=True)
    return notes


class AllReduceSum(torch.autograd.Function):
    """A sum over the processes whose backward sums the gradients too (every process's loss depends on it)."""

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
    """BatchNorm2d with the global batch's statistics under torch.distributed (gloo or NCCL), the moments
    summed by an autograd-aware all-reduce so that the gradient is the one-process batch's. (torch's
    SyncBatchNorm refuses CPU tensors, and on a GPU reads a count back to the host in every layer.)"""

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


def average_replicas(models, world, buffers=True):
    """Data parallelism by hand: the mean of the gradients (DDP's reducer) and, without --sync-bn, rank 0's
    BatchNorm statistics everywhere (DDP's broadcast_buffers). Not DDP itself: AWP evaluates the target at
    w + delta through functional_call and ISEAT differentiates through two weight sets in one graph, which
    DDP's reducer hooks do not follow (the cost: no overlap of communication with the backward pass)."""
    params = [p for m in models for p in m.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(chunk.view_as(p.grad))
    if buffers:
        floats = [b for m in models for b in m.buffers() if b.is_floating_point()]
        flat = torch.cat([b.reshape(-1) for b in floats])
        dist.broadcast(flat, 0)
        for b, chunk in zip(floats, flat.split([b.numel() for b in floats])):
            b.copy_(chunk.view_as(b))


def check_replicas(models):
    """Stop if any parameter or buffer differs bitwise from rank 0's (replicas drifting apart)."""
    flat = torch.cat([t.detach().reshape(-1).double() for m in models for t in [*m.parameters(), *m.buffers()]])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    differs = torch.tensor([float(not torch.equal(flat, reference))], device=flat.device)
    dist.all_reduce(differs)
    if differs.item():
        raise RuntimeError("model replicas differ across processes; data parallelism is broken")


def synchronise_batchnorm(model):
    """Every BatchNorm2d of `model` becomes a GlobalBatchNorm2d (same state_dict keys), in place."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            bn = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            synchronise_batchnorm(child)
    return model
