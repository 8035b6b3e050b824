"""Models of the DYNAT paper: CIFAR ResNet-18 and WideResNet-D-K, and their state_dicts.

Both take [0, 1] pixels (no normalisation layer, as the paper's models) of any size
(adaptive pooling) and any number of classes. `build_model(name, num_classes)` is the
one entry point; `load_state` loads a checkpoint strictly, after `remap_state_dict` has
said, key by key, how one written by another codebase maps onto ours. (Writing and reading checkpoints,
and a model's replicas across torchrun's processes: dynat_runs.py.)
"""
import re

import torch
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


