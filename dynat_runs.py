"""What a run of dynat.py or evaluate.py needs around the algorithm, in one place for both (and tools/):
one-line errors, the flags the scripts share, precision, processes (torchrun) and averaged weights, out-dirs
held by one process and written atomically, sealed checkpoints, the run's order and resume, and an epoch's
figures (the training sums, the evaluation, metrics.jsonl, the curves).

The algorithm is not here: it is dynat.py's block (its Config holds the algorithm's settings; FLAGS here, the
program's). `ours` imports our models.py and data.py by their plain names even beside a research repo's own
`models/` package, which would otherwise come first.
"""
import argparse
import contextlib
import glob
import hashlib
import importlib.util
import json
import math
import os
import pickle
import platform
import shutil
import signal
import socket
import subprocess
import sys
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn


# ----------------------------------------------------------------------------- errors

class UsageError(Exception):
    """Bad input: the scripts print the message on one line and exit with code 2."""


class Stopped(Exception):
    """A run cannot go on (a loss or a weight became inf/nan, a write failed): one line, exit 1; last.pt keeps the
    last good state."""


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once, exit 128 + signum."""


def checked(fn, *args, prefix=""):
    """fn(*args), a function of models.py or data.py, whose ValueError (a one-line reason) is a usage error here."""
    try:
        return fn(*args)
    except ValueError as e:
        raise UsageError(prefix + str(e))


def exit_code(script, run, *, stopped="", interrupted):
    """run()'s exit code, every failure the scripts expect said in one line on stderr, never a traceback: bad
    input 2; a run that cannot go on (Stopped, `stopped` appended) or a file that cannot be read or written 1;
    an interrupt (`interrupted` said) 128 + its signal."""
    try:
        return run()
    except UsageError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"{script}: stopped: {e}{stopped}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a second signal (StopNow), or Ctrl-C before a loop's handlers
        print(f"{script}: {interrupted}", file=sys.stderr)
        return 128 + (e.args[0] if isinstance(e, StopNow) else signal.SIGINT)
    except OSError as e:  # a file that cannot be read or written (data, out-dir)
        print(f"{script}: error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- our modules

@contextlib.contextmanager
def ours(*names):
    """Inside the `with`, `import models` (or data) imports the file of that name beside this one, once per process:
    a research repo's own models/ package would come first on sys.path (a package wins over a module in the same
    folder). sys.modules holds their module again afterwards, so their own `import models` still finds theirs."""
    here, saved = os.path.dirname(os.path.abspath(__file__)), {n: sys.modules.pop(n) for n in names if n in sys.modules}
    try:
        for name in names:
            key = f"dynat_{name}"
            if key not in sys.modules:
                spec = importlib.util.spec_from_file_location(key, os.path.join(here, f"{name}.py"))
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules[key] = module
            sys.modules[name] = sys.modules[key]
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


with ours("models", "data"):
    import data  # noqa: E402  (ours: models.py and data.py beside this file)
    import models  # noqa: E402


# ----------------------------------------------------------------------------- flags the scripts share

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


FLAGS = {  # the program's settings, each defined once: dynat.py's, and those evaluate.py and tools/ share with it
    "dataset": dict(default="cifar10", choices=data.DATASETS,
                    help="imagefolder: --data-dir DIR/{train,test}/<class>/*"),
    "data_dir": dict(default="./data", help="where the dataset lives (CIFAR/MNIST downloaded when absent)"),
    "target": dict(default="wrn-34-10", help="target model f_t: resnet18 or wrn-D-K (D = 6n+4)"),
    "guide": dict(default="resnet18", help="guide model f_g (the same choices)"),
    "epochs": dict(type=int, default=100, help="epochs of Algorithm 1"),
    "out_dir": dict(default="runs/dynat", help="where metrics, curves and checkpoints go"),
    "resume": dict(nargs="?", const="auto", default=None, metavar="DIR", help="alone (or 'auto'): continue the run in "
                   "--out-dir if there is one (the same flags), else start it, as evaluate.py's --resume; "
                   "DIR: continue the run in DIR from DIR/last.pt%(default).0s"),
    # DYNAT's variants' schedules, and ours
    "awp_warmup": dict(type=int, default=10, help="first epoch with AWP"),
    "reweight_start": dict(type=int, default=70, help="first epoch of --reweight and --iseat (burn-in)"),
    "ema": dict(type=float, default=0.0, metavar="DECAY", help="an exponential moving average of the target's "
                "weights, evaluated beside it (0: off, the paper)"),
    "guide_warmup": dict(type=int, default=0, metavar="EPOCHS", help="guide-only epochs first (ours; 0: the paper; "
                         "docs/training-dynamics.md)"),
    "target_clip": dict(type=float, default=0.0, metavar="NORM", help="clip the target's gradient norm in its first "
                        "epochs (ours; 0: the paper)"),
    "target_clip_epochs": dict(type=int, default=2, help="how many of the target's first epochs --target-clip lasts"),
    # the comparison methods' schedules
    "fat_tau": dict(type=number_list(int), default=(), metavar="T,T", help="FAT's early-stopped PGD: tau per "
                    "--fat-tau-milestones (unset: off)%(default).0s"),
    "fat_tau_milestones": dict(type=number_list(int), default=(), metavar="E,E",
                               help="epochs from which the next tau holds%(default).0s"),
    "sat": dict(action="store_true", help="SAT: self-adaptive soft targets for --loss trades"),
    "sat_start": dict(type=int, default=70, help="first epoch of --sat"),
    # data and schedule
    "batch_size": dict(type=int, default=128, help="global batch size m (split across processes)"),
    "lr": dict(type=float, default=0.1, help="learning rate"),
    "lr_milestones": dict(type=number_list(int), default=None, metavar="E,E", help="epochs from which the --lr-factors "
                          "apply (unset: after 75%% and 90%% of --epochs)%(default).0s"),
    "lr_factors": dict(type=number_list(float), default=None, metavar="F,F",
                       help="lr factor from each milestone (unset: 0.1,0.01)%(default).0s"),
    "lr_warm_start": dict(type=float, default=0.2, help="lr factor of the first epoch (1: none)"),
    "momentum": dict(type=float, default=0.9, help="SGD momentum"),
    "weight_decay": dict(type=float, default=2e-4, help="SGD weight decay"),
    "train_size": dict(type=int, default=0, help="class-balanced subset: the first N/C images of each class (0: all)"),
    "val_size": dict(type=int, default=0, help="training images held out to choose best.pt on (0: none)"),
    "augment": dict(action=argparse.BooleanOptionalAction, default=True, help="random crop (4-pixel zero padding) "
                    "and horizontal flip of every training batch (Sec. 4.1)"),
    # precision, devices and processes
    "seed": dict(type=int, default=0, help="random seed (data order, augmentation, attack starts)"),
    "deterministic": dict(action="store_true", help="deterministic kernels (bitwise repeatable on a CPU)"),
    "device": dict(default="auto", help="auto, cpu, cuda or cuda:N"),
    "amp": dict(default="auto", choices=["auto", "none", "bf16", "fp16"], help="autocast (auto: bf16 on Ampere+ GPUs)"),
    "channels_last": dict(action=argparse.BooleanOptionalAction, default=True, help="channels_last memory format"),
    "compile": dict(action="store_true", help="torch.compile both models"),
    "sync_bn": dict(action="store_true", help="BatchNorm statistics of the global batch (torchrun)"),
    "workers": dict(type=int, default=2, help="processes decoding an ImageFolder once at start-up"),
    "overwrite": dict(action="store_true", help="allow writing into a non-empty --out-dir"),
    # evaluation during training
    "eval_every": dict(type=int, default=1, help="evaluate every N epochs (and always at the last)"),
    "eval_pgd_n": dict(type=int, default=1000, help="images of the per-epoch PGD-10 check"),
    "dry_run": dict(action="store_true", help="one batch per epoch and one evaluation batch (smoke tests)"),
}


def add_flags(group, *names, **changes):
    """--name for each of `names` as FLAGS defines it; changes[name] (a dict) alters it for another script."""
    for name in names:
        group.add_argument("--" + name.replace("_", "-"), **{**FLAGS[name], **changes.get(name, {})})


def require(args, names, ok, what):
    """UsageError naming the flag unless ok(value) for each flag of `names` (None skips)."""
    for name in names:
        v = getattr(args, name)
        if v is not None and not ok(v):
            raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {v:g}")


# ----------------------------------------------------------------------------- precision, processes, averaged weights

def amp_dtype(amp, device):
    """Autocast dtype of --amp (None: float32); auto is bf16 only on a GPU that runs it natively (Ampere+)."""
    if amp == "auto":
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device, dtype):
    """torch.autocast in `dtype` (None: float32): matmuls and convolutions only; BatchNorm stays float32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


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


def exit_process(code):
    """sys.exit(code); under torchrun, os._exit(code) once stdout and stderr are flushed, skipping the interpreter's
    and libtorch's teardown: there, with torch 2.14.1 and gloo, a finished worker aborted in 2 of about 400 two-process
    runs ("terminate called without an active exception", SIGABRT, after main had returned), which torchrun counts
    as a failed job. Call it when every file is written and closed and the process group destroyed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def torchrun_notes(resume_auto):
    """What a torchrun --max-restarts launch needs said before it starts (rank 0, on stderr)."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and int(os.environ.get("RANK", "0")) == 0:
        if not resume_auto:
            print("note: torchrun --max-restarts: pass --resume, or a restart will refuse its non-empty --out-dir",
                  file=sys.stderr, flush=True)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # seen failing with torch 2.14.1
            print("note: torchrun --max-restarts: start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, or a "
                  "restart may fail to connect on stale addresses in torchrun's shared store (pytorch/pytorch#135712)",
                  file=sys.stderr, flush=True)


def configure_backends(deterministic, warn_only=False):
    """deterministic (dynat.py --deterministic; evaluate.py always, so that a resumed evaluation gives an
    uninterrupted one's numbers): deterministic kernels, bitwise repeatable on a CPU; warn_only: an op without a
    deterministic implementation warns instead of failing. Else cuDNN autotunes (fixed shapes). float32 means
    float32: no TF32 (torch's default runs cuDNN convolutions in TF32 on Ampere and newer)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not deterministic, deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


STOP_SIGNALS, STOP_FLAGS = (signal.SIGINT, signal.SIGTERM), ("stop_sigint", "stop_sigterm")


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


def update_ema(average, model, decay):
    """--ema after a step: average's parameters <- decay * average + (1 - decay) * model's; its BatchNorm statistics
    are the model's own, copied, as the EMA of DM-Improves-AT and adversarial_robustness_pytorch does (update_bn)."""
    with torch.no_grad():
        for p_ema, p in zip(average.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - decay)
        for b_ema, b in zip(average.buffers(), model.buffers()):
            b_ema.copy_(b)


def check_replicas(models):
    """Stop if any parameter or buffer differs bitwise from rank 0's (replicas drifting apart)."""
    flat = torch.cat([t.detach().reshape(-1).double() for m in models for t in [*m.parameters(), *m.buffers()]])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    differs = torch.tensor([float(not torch.equal(flat, reference))], device=flat.device)
    dist.all_reduce(differs)
    if differs.item():
        raise RuntimeError("model replicas differ across processes; data parallelism is broken")


# ----------------------------------------------------------------------------- files

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


def check_out_dir(out_dir, *, resuming, fresh, overwrite, main_process=True):
    """Before a run's first step. Resuming: room on the disk for the next checkpoints (last.pt's and best.pt's size)
    before an epoch is spent on them. A fresh run: refused in a non-empty out-dir unless --overwrite, which removes
    a stale last.pt and best.pt (another run's best.pt must not pass for this one's)."""
    paths = [os.path.join(out_dir, n) for n in ("last.pt", "best.pt")]
    if resuming and main_process:
        need, free = sum(os.path.getsize(p) for p in paths if os.path.isfile(p)), shutil.disk_usage(out_dir).free
        if free < need:
            raise Stopped(f"{out_dir}: {free / 2**20:.0f} MiB free, the next checkpoints need {need / 2**20:.0f} "
                          "MiB (last.pt's and best.pt's size): free some space, then resume")
    if fresh and os.path.isdir(out_dir) and set(os.listdir(out_dir)) - {LOCK}:
        if not overwrite:
            raise UsageError(f"--out-dir {out_dir} is not empty: pass --resume {out_dir} or --overwrite")
        for path in paths if main_process else ():
            if os.path.isfile(path):
                os.remove(path)


def machine(device, processes=1):
    """What a timing was measured on: the GPU's name, or the CPU's model and the threads torch uses, times the
    processes (torchrun's) where there are several."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            cpu = platform.processor() or "CPU"
        threads = torch.get_num_threads()
        name = f"{cpu}, {threads} thread{'s' * (threads != 1)}"
    return name + (f" × {processes} processes" if processes > 1 else "")


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


# ----------------------------------------------------------------------------- checkpoints

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
    """torch.load(weights_only=True) with one-line errors (UsageError): nothing in the file is ever executed; a
    checkpoint that seal wrote must match its SHA-256 (bytes changed on the disk or in a copy load, but differently)."""
    if not os.path.isfile(path):
        if not os.path.isdir(path):
            raise UsageError(f"{path}: no such checkpoint file")
        found = [os.path.join(path, n) for n in ("last.pt", "best.pt") if os.path.isfile(os.path.join(path, n))]
        raise UsageError(f"{path}: a directory, not a checkpoint" + (f": pass {' or '.join(found)}" if found else
                                                                     " (it holds no last.pt or best.pt)"))
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a legacy pickle
        raise UsageError(f"{path}: not a checkpoint (torch.save writes a zip archive or a pickle; this file "
                         f"starts with {head!r}): pass a last.pt / best.pt or a saved state_dict")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{path}: refused: it holds objects that need arbitrary code to unpickle "
                         "(only tensors and plain containers are loaded)")
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{path}: truncated or corrupt checkpoint ({first_line})")
    if isinstance(ckpt, dict) and "sha256" in ckpt:
        written = ckpt.pop("sha256")
        if contents_sha256(ckpt) != written:
            raise UsageError(f"{path}: corrupt: its contents do not match the SHA-256 written with them")
    return ckpt


def load_weights(model, state_dict, source, log=print):
    """models.load_state, its notes logged and a mismatch one line naming `source`."""
    for note in checked(models.load_state, model, state_dict, prefix=f"{source}: "):
        log(f"{source}: {note}")


def save_checkpoint(path, ckpt):
    """ckpt sealed (on the CPU, its SHA-256 inside) and written atomically; one with inf or nan is never written."""
    try:
        sealed = seal(ckpt)
    except ValueError as e:
        kept = f"{path} keeps the last good state" if os.path.isfile(path) else f"no {os.path.basename(path)} yet"
        raise Stopped(f"{e}: not saved; {kept}") from None
    write_atomic(path, lambda f: torch.save(sealed, f))


# ----------------------------------------------------------------------------- the run's order, and resume

def epoch_batches(n, batch_size, seed, epoch, world=1, device="cpu", limit=None):
    """The epoch's shuffled index batches, a pure function of (seed, epoch): a resume sees the same order.
    A last batch smaller than the world is dropped."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)
    batches = perm.split(batch_size)[:limit]
    return batches[:-1] if len(batches[-1]) < world else batches


def step_seed(seed, epoch, step, rank):
    """The seed of one step's randomness (augmentation, attack start): exact resume at any batch."""
    return (((seed * 100_003 + epoch) * 1_000_003 + step) * 1_009 + rank) % (2 ** 63)


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


def resolve_resume(args, argv, get_parser):
    """(the arguments to train with, DIR/last.pt's contents or None). --resume DIR: the run's own arguments; flags
    written in `argv` that would change the run are refused, one reason each. --resume alone (auto): the run in
    --out-dir as --resume DIR would, every flag counting as written (the command must be the run's own); or, where
    --out-dir holds no run, a new one (an out-dir holding anything else is refused as without --resume)."""
    auto = args.resume == "auto"
    if not args.resume:
        return args, None
    if auto and not any(os.path.isfile(os.path.join(args.out_dir, n)) for n in ("last.pt", "args.json")):
        args.resume = None
        return args, None
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
        try:
            with open(saved) as f:
                stored = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{saved}: not the JSON dynat.py writes ({e}): nothing to resume from") from None
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


# ----------------------------------------------------------------------------- an epoch's figures

STEP_STATS = ("loss_guide", "loss_target", "loss_iseat", "dyn_correct")  # dynat.train_step's, summed over an epoch


def add_step(sums, values, seen, world, where):
    """The step's figures (train_step's one tensor, read once) added to the epoch's sums; the signal any process
    received, if one did. A loss that is not finite stops the run before anything is saved (last.pt stays good)."""
    values = dict(zip(STEP_STATS + STOP_FLAGS, values.tolist()))
    for name in STEP_STATS:
        if not math.isfinite(values[name]):
            raise Stopped(f"{name} is {values[name]} at {where}")
        sums[name] += values[name] / world if name.startswith("loss") else values[name]
    sums["seen"] += seen
    sums["step"] += 1
    return next((s for s, f in zip(STOP_SIGNALS, STOP_FLAGS) if values.get(f, 0) > 0), None), values


def epoch_row(epoch, lr, paper_epoch, sums, has_guide, host):
    """An epoch's metrics from its training sums (evaluate_epoch adds the evaluation's); `host`: machine()'s, of
    the process that finishes the epoch."""
    n_steps = max(sums["step"], 1)
    return {"epoch": epoch, "lr": lr, "seconds": round(sums["seconds"], 3), "machine": host,
            "target_trained": paper_epoch > 0,
            "loss_guide": sums["loss_guide"] / n_steps if has_guide else None,
            "loss_target": sums["loss_target"] / n_steps if paper_epoch > 0 else None,
            "dynamic_label_acc": sums["dyn_correct"] / sums["seen"] if has_guide else None}


def classify(model, x, y, *, device, batch_size=256, attack=None, channels_last=False, fixed_shape=False,
             progress=None):
    """(predicted class, correct) per image of the uint8 images x, on the CPU, `model` in eval mode (then as
    it came), in the caller's autocast. attack(model, x, y) -> (x', mask): its x' are classified, and an image
    is correct only where the mask holds too (dynat.pgd's: right at every iterate of the attack). fixed_shape
    pads the last chunk with copies of an image: one shape for every forward, so cuDNN autotunes once and compile
    never recompiles."""
    was_training, out = model.training, []
    model.eval()
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            n = len(yb)
            if fixed_shape and n < batch_size:
                xb = torch.cat([xb, xb[:1].expand(batch_size - n, *xb.shape[1:])])
                yb = torch.cat([yb, yb[:1].expand(batch_size - n)])
            xb, yb = data.to_input(xb, device, channels_last), yb.to(device)
            every = torch.ones_like(yb, dtype=torch.bool)
            if attack is not None:
                xb, every = attack(model, xb, yb)
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
    """Per example: correct clean (`clean`: a mask) and under each of `restarts` runs of classify's `attack`."""
    robust = (classify(model, x, y, **common)[1] if clean is None else clean).clone()
    for _ in range(restarts):
        idx = robust.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        if progress is not None:
            progress.total += len(idx)
        robust[idx] = classify(model, x[idx], y[idx], attack=attack, progress=progress, **common)[1]
    return robust


def evaluate_epoch(nets, sets, args, epoch, device, amp, fixed_shape, pgd):
    """Per-epoch figures (rank 0, the run's precision): each model's clean test accuracy and how many classes
    it predicts (1 = dead); the target's (and its EMA's) PGD-10 on the validation split if any, else on
    --eval-pgd-n test images, in the run's threat model (pgd: dynat.pgd, the block's perturb as classify's attack)."""
    (x_test, y_test), val = sets["test"], sets["val"]
    limit = args.batch_size if args.dry_run else len(y_test)
    common = dict(device=device, batch_size=max(args.batch_size, 256), channels_last=args.channels_last,
                  fixed_shape=fixed_shape)
    row = {}
    with autocast(device, amp):
        for name, model in nets.items():
            row[f"{name}_clean_acc"] = row[f"{name}_pred_classes"] = None
            if model is not None:
                pred, correct = classify(model, x_test[:limit], y_test[:limit], **common)
                row[f"{name}_clean_acc"] = correct.float().mean().item()
                row[f"{name}_pred_classes"] = len(pred.unique())
        x_pgd, y_pgd = val if val is not None else (x_test, y_test)
        n = min(args.eval_pgd_n, len(y_pgd), limit)
        pgd10 = pgd(epsilon=args.epsilon, step_size=args.step_size, num_steps=10, loss="ce", start="uniform",
                    norm=args.norm)
        for name in ("target", "ema") if nets.get("ema") is not None else ("target",):
            torch.manual_seed(step_seed(args.seed, epoch, 1_000_000, 0))  # the same starts, and after a resume
            robust = robust_mask(nets[name], x_pgd[:n], y_pgd[:n], pgd10, **common)
            row[f"{name}_pgd_acc"] = robust.float().mean().item()
    return row | {"pgd_split": "val" if val is not None else "test", "pgd_n": n, "pgd_norm": args.norm}


NOT_EVALUATED = dict.fromkeys(("guide_clean_acc", "guide_pred_classes", "target_clean_acc", "target_pred_classes",
                               "ema_clean_acc", "ema_pred_classes", "target_pgd_acc", "ema_pgd_acc", "pgd_split",
                               "pgd_n", "pgd_norm"))  # an epoch's row between evaluations (--eval-every)


def metrics_before(path, epoch):
    """The rows of metrics.jsonl (one per epoch) before `epoch`, and the file cut back to them: a resume redoes the
    rest. A line torn by a kill or a full disk is the last one read."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                rows += [row] * (row["epoch"] < epoch)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def progress_bar(total, desc, initial=0, show=True, **kw):
    """tqdm's bar on an interactive terminal only: a redirected log gets the scripts' own lines."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, initial=initial, leave=False, dynamic_ncols=True,
                disable=not (show and sys.stderr.isatty()), **kw)


CURVES = {"dynamic_label_acc": (0, "dynamic labels = y (train)"), "guide_clean_acc": (0, "guide, clean (test)"),
          "target_clean_acc": (0, "target, clean (test)"), "target_pgd_acc": (0, "target, PGD-10"),
          "ema_clean_acc": (0, "target's EMA, clean (test)"), "ema_pgd_acc": (0, "target's EMA, PGD-10"),
          "loss_guide": (1, "guide loss L_g"), "loss_target": (1, "target loss")}  # metric: (panel, label)


def plot_curves(rows, path, title):
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
    acc.set_title(title, fontsize=9, wrap=True)
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
