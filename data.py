"""The datasets of dynat.py and evaluate.py, held whole in memory as uint8 tensors and augmented on the
training device (no data loader in the training step: airbench's trick).

load_data(name, dir) gives {"train": (x, y), "val": (x, y) or None, "test": (x, y), "classes": C}, x uint8
N x 3 x H x W and y int64 N.
CIFAR-10/100 and (Fashion-)MNIST come from torchvision's loaders (downloaded when absent); offline, a
ValueError says in one line which file to put where. imagefolder reads DIR/{train,test}/<class>/*;
synthetic is a fixed random set of CIFAR's shape for smoke tests and benchmarks.
"""
import datetime
import os

import torch
import torch.distributed as dist

DATASETS = ["cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "synthetic"]
CIFAR_FILES = {"cifar10": ("CIFAR10", "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
               "cifar100": ("CIFAR100", "cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")}
MNIST_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
DEBIAN_FILES = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}  # apt-get install dataset-fashion-mnist


def load_data(dataset, data_dir, workers=2, train_size=0, val_size=0, seed=0, rank=0, world=1):
    """The dataset, whole (CIFAR is 150 MB as uint8): --train-size's class-balanced subset of the training
    images, --val-size of them held out. Under torchrun (world > 1) the processes load in turns."""
    out = load_in_turns(rank, world, lambda: _load(dataset, data_dir, workers))
    out["train"], out["val"] = training_split(out["train"], out["classes"], train_size, val_size, seed)
    if len(out["train"][1]) == 0 or len(out["test"][1]) == 0:
        raise ValueError(f"{dataset} at {data_dir}: no images in the training or test split")
    return out


def _load(dataset, data_dir, workers):
    import torchvision
    if dataset == "synthetic":
        g = torch.Generator().manual_seed(12345)  # fixed, whatever --seed is: a benchmark's data
        make = lambda n: (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                          torch.randint(0, 10, (n,), generator=g))
        return {"train": make(1024), "test": make(256), "classes": 10}
    if dataset in CIFAR_FILES or dataset in MNIST_CLASSES:
        splits, images = (_load_cifar if dataset in CIFAR_FILES else _load_mnist)(dataset, data_dir)
        return {"train": (images[0].contiguous(), torch.as_tensor(splits[0].targets, dtype=torch.long)),
                "test": (images[1].contiguous(), torch.as_tensor(splits[1].targets, dtype=torch.long)),
                "classes": len(splits[0].classes)}
    import numpy as np
    from PIL import Image
    roots = [os.path.join(data_dir, s) for s in ("train", "test")]
    for r in roots:
        if not os.path.isdir(r):
            raise ValueError(f"{r}: no such directory (imagefolder expects DATA_DIR/train/<class>/ and DATA_DIR/test/<class>/)")
    try:
        folders = [torchvision.datasets.ImageFolder(r) for r in roots]
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f"imagefolder {data_dir}: {str(e).splitlines()[0]}")
    if folders[0].classes != folders[1].classes:
        raise ValueError(f"imagefolder {data_dir}: train and test have different classes "
                         f"({len(folders[0].classes)} vs {len(folders[1].classes)})")
    size = Image.open(folders[0].samples[0][0]).size
    out = {"classes": len(folders[0].classes)}
    for name, ds in zip(("train", "test"), folders):
        # RGB, resized to the first training image's size where it differs; decoded once, by `workers` processes
        ds.transform = lambda img: img.convert("RGB") if img.size == size else img.convert("RGB").resize(size)
        loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers, collate_fn=lambda b: (
            np.stack([np.asarray(img, dtype=np.uint8) for img, _ in b]), [t for _, t in b]))
        xs, ys = zip(*loader) if len(ds) else ((), ())
        out[name] = (torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2).contiguous() if xs else torch.zeros(0),
                     torch.tensor([t for batch in ys for t in batch], dtype=torch.long))
    return out


def load_in_turns(rank, world, load):
    """load() under torchrun without two processes writing one download: global rank 0 first, then each other
    node's first process (a node-local --data-dir), then the rest. The waits use a gloo group with a two-hour
    timeout (NCCL's ten minutes would kill them during a slow download; the training keeps NCCL's default)."""
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


def _load_cifar(dataset, data_dir):
    """torchvision's CIFAR-10/100 (downloaded when absent), with a one-line reason when it cannot load."""
    import torchvision
    from torchvision.datasets.utils import check_integrity
    cls_name, archive, url = CIFAR_FILES[dataset]
    cls = getattr(torchvision.datasets, cls_name)
    archive_path = os.path.join(os.path.abspath(data_dir), archive)
    extracted = os.path.join(os.path.abspath(data_dir), cls.base_folder)
    if os.path.isfile(archive_path) and not check_integrity(archive_path, cls.tgz_md5):
        # torchvision would silently download it again and, offline, fail with a misleading reason
        raise ValueError(f"{archive_path} is there but fails its MD5 checksum (an incomplete or corrupt "
                         f"download): delete it and download it again from {url}")
    try:
        splits = [cls(data_dir, train=train, download=True) for train in (True, False)]
    except Exception as e:  # no network, bad archive, ...: say what to put where
        if os.path.isdir(extracted):
            raise ValueError(f"{extracted} is incomplete or corrupt (a file is missing or fails its MD5 "
                             f"checksum): delete it and put {archive} (from {url}) into {os.path.dirname(extracted)}/")
        raise ValueError(f"cannot load {dataset} from {data_dir} ({type(e).__name__}); "
                         f"put {archive} (from {url}) into {os.path.abspath(data_dir)}/")
    return splits, [torch.from_numpy(ds.data).permute(0, 3, 1, 2) for ds in splits]


def _load_mnist(dataset, data_dir):
    """torchvision's MNIST / Fashion-MNIST (downloaded when absent). Offline, the four original idx .gz
    files in DATA_DIR/<MNIST|FashionMNIST>/raw/ are extracted there as torchvision would (its own check
    rejects recompressed copies such as Debian's by their MD5, and then tries to download)."""
    import gzip
    import shutil
    import uuid
    import zlib
    import torchvision
    cls = getattr(torchvision.datasets, MNIST_CLASSES[dataset])
    raw = os.path.join(os.path.abspath(data_dir), cls.__name__, "raw")
    files = [name for name, _ in cls.resources]
    for name in files:
        gz, plain = os.path.join(raw, name), os.path.join(raw, name[:-len(".gz")])
        if os.path.isfile(gz) and not os.path.isfile(plain):
            # each process extracts into a part file of its own (several seeds started at once on a fresh
            # folder all extract), and a half-extracted file never passes for the whole one
            part = f"{plain}.{uuid.uuid4().hex}.part"  # not mkstemp: its files are private to their owner
            try:
                with gzip.open(gz) as src, open(part, "xb") as dst:
                    shutil.copyfileobj(src, dst)
                    if not dst.tell():  # gzip reads an empty file as empty data; torchvision fails on it later
                        raise EOFError("it holds no data")
                os.replace(part, plain)
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # the archive's bytes: bad input
                raise ValueError(f"{gz}: not a valid gzip file ({e}); copy it again")
            except OSError as e:  # reading or writing failed (no space, no permission): the archive may be fine
                raise OSError(e.errno, f"{e.strerror or e} (extracting {gz})", e.filename or plain) from None
            finally:  # a failed or interrupted extraction leaves nothing behind
                if os.path.exists(part):
                    os.remove(part)
    try:
        splits = [cls(data_dir, train=train, download=True) for train in (True, False)]
    except Exception as e:
        where = f"cp {DEBIAN_FILES[dataset]}/*.gz {raw}/ after apt-get install dataset-fashion-mnist, or " \
            if dataset in DEBIAN_FILES else ""
        raise ValueError(f"cannot load {dataset} from {data_dir} ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:80].rstrip(':')}); put {', '.join(files)} into {raw}/ "
                         f"({where}from {cls.mirrors[0]})")
    # 28 x 28 grey images repeated into 3 channels: the models and the attack see RGB-shaped [0, 1] pixels
    return splits, [ds.data[:, None].expand(-1, 3, -1, -1) for ds in splits]


def training_split(train, classes, train_size, val_size, seed):
    """(train, val): --train-size's class-balanced subset (the first N/C images of each class, in the
    dataset's order), then --val-size images held out by a fixed permutation of --seed (val None if 0)."""
    x, y = train
    if train_size:
        per_class, counts = train_size // classes, torch.bincount(y, minlength=classes)
        if per_class < 1 or per_class > counts.min():
            raise ValueError(f"--train-size {train_size}: needs between {classes} and {int(counts.min()) * classes} "
                             f"images ({classes} classes, the smallest has {int(counts.min())} training images)")
        keep = torch.cat([(y == c).nonzero().squeeze(1)[:per_class] for c in range(classes)]).sort().values
        x, y = x[keep], y[keep]
    if val_size == 0:
        return (x, y), None
    if val_size >= len(y):
        raise ValueError(f"--val-size {val_size} must be smaller than the training set ({len(y)} images)")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return (x[perm[:-val_size]], y[perm[:-val_size]]), (x[perm[-val_size:]], y[perm[-val_size:]])


def to_input(x_uint8, device, channels_last=False):
    """uint8 images -> float [0, 1] on `device` (the models see unnormalised pixels)."""
    x = x_uint8.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def augment(x):
    """Random crop to the image's size with 4-pixel zero padding + horizontal flip, per example (Sec. 4.1)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b, 1, 1), device=x.device)
    dx = torch.randint(0, 9, (b, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(b, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(b, h, w)
    flip = torch.rand(b, 1, 1, device=x.device) < 0.5
    cols = torch.where(flip, dx + (w - 1) - (cols - dx), cols)
    idx = (rows * (w + 8) + cols).view(b, 1, h * w).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, idx).view_as(x)


def train_batch(images, labels, idx, device, channels_last=False, augmented=True):
    """Batch `idx` of the dataset (uint8 N x 3 x H x W and int64 N, on the device): float [0, 1]
    B x 3 x H x W, augmented unless not `augmented`, channels_last when asked, and its labels."""
    x = to_input(images[idx], device)
    x = augment(x) if augmented else x
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), labels[idx]


