"""The training loop of dynat.py, in process: host reads per step, the guide warm-up, --target-clip, the
collapse warning, --resume's refusals, and the MNIST-format and CIFAR loaders (on files built here: no download)."""
import collections
import contextlib
import copy
import gzip
import json
import os
import socket
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn

import dynat
import dynat_runs
from test_scripts import make_imagefolder

TINY = ["--target", "wrn-10-1", "--guide", "wrn-10-1", "--num-steps", "1", "--eval-pgd-n", "8", "--workers", "0",
        "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread_and_signals")  # conftest.py


def spy_steps(monkeypatch, after=None):
    """Wrap dynat.train_step: record each call's arguments (and `after(call)` once the step is taken)."""
    calls, real = [], dynat.train_step

    def train_step(target, guide, optimizer, scaler, x, y, cfg, **kw):
        call = dict(target=target, guide=guide, optimizer=optimizer, cfg=cfg, **kw)
        calls.append(call)
        values = real(target, guide, optimizer, scaler, x, y, cfg, **kw)
        if after is not None:
            after(call)
        return values
    monkeypatch.setattr(dynat, "train_step", train_step)
    return calls


# ----------------------------------------------------------------------------- host reads

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def counting_host_reads(monkeypatch):
    """Count the Tensor calls that copy device data to the host (and wait for it on a GPU) from the first
    training step on until the epoch's evaluation or replica check: the steps' reads, the loop's included.
    (`.to()` a CPU device counts only from another device: on this machine the training device is the CPU.)"""
    counts, active = collections.Counter(), [False]
    real = {name: getattr(torch.Tensor, name) for name in HOST_READS + ("to",)}

    def counted(name):
        def method(self, *a, **kw):
            counts[name] += active[0]
            return real[name](self, *a, **kw)
        return method

    def to(self, *a, **kw):
        dest = kw.get("device", a[0] if a and isinstance(a[0], (str, torch.device)) else None)
        if dest is not None and torch.device(dest).type == "cpu" and self.device.type != "cpu":
            counts["to('cpu')"] += active[0]
        return real["to"](self, *a, **kw)

    def switch(fn, on):
        def wrapped(*a, **kw):
            active[0] = on
            return fn(*a, **kw)
        return wrapped
    steps = spy_steps(monkeypatch)
    monkeypatch.setattr(dynat, "train_step", switch(dynat.train_step, True))
    monkeypatch.setattr(dynat, "evaluate_epoch", switch(dynat.evaluate_epoch, False))
    monkeypatch.setattr(dynat, "check_replicas", switch(dynat.check_replicas, False))
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        torch.Tensor.to = to
        yield counts, steps
    finally:
        for name, method in real.items():
            setattr(torch.Tensor, name, method)


def loop_argv(out):
    # one epoch of 5 steps of 32 on a class-balanced 160-image subset; AWP and MAIL on, as their paths run in the step
    return ["--dataset", "synthetic", "--train-size", "160", "--batch-size", "32", "--epochs", "1", "--awp",
            "--awp-warmup", "1", "--reweight", "mail", "--reweight-start", "1", "--out-dir", str(out), *TINY]


def test_one_host_read_per_training_step(tmp_path, monkeypatch):
    with counting_host_reads(monkeypatch) as (counts, steps):
        assert dynat.main(loop_argv(tmp_path / "run")) == 0
    assert len(steps) == 5 and steps[0]["cfg"].awp and steps[0]["cfg"].reweight == "mail"
    assert sum(counts.values()) <= len(steps), counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: counts the syncs CUDA itself reports")
def test_one_cuda_sync_per_training_step_on_a_gpu(tmp_path, monkeypatch):
    """On a GPU, torch's sync debug mode reports every host wait (copies, .item(), boolean indexing)."""
    import warnings
    syncs, real = [], dynat.train_step

    def train_step(*a, **kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                values = real(*a, **kw)
                values.tolist()  # the loop's one read
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs.append([str(w.message) for w in caught if "synchroniz" in str(w.message).lower()])
        return values
    monkeypatch.setattr(dynat, "train_step", train_step)
    argv = loop_argv(tmp_path / "run")
    argv[argv.index("cpu")] = "cuda"
    assert dynat.main(argv + ["--epochs", "2"]) == 0
    later = syncs[5:]  # the second epoch: cuDNN autotuning and the allocator have warmed up
    assert all(len(s) <= 1 for s in later), later[:3]


def _two_process_worker(rank, port, out, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    monkeypatch = pytest.MonkeyPatch()
    try:
        with counting_host_reads(monkeypatch) as (counts, steps):
            assert dynat.main(loop_argv(out) + ["--sync-bn"]) == 0
        with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
            json.dump({"steps": len(steps), "counts": counts}, f)
    finally:
        monkeypatch.undo()


def test_at_most_two_host_reads_per_step_under_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_two_process_worker, args=(port, str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        with open(tmp_path / f"{rank}.json") as f:
            result = json.load(f)
        assert result["steps"] == 5  # the bound under torchrun is 2 reads per step; the loop does 1
        assert sum(result["counts"].values()) <= result["steps"], (rank, result["counts"])


# ----------------------------------------------------------------------------- guide warm-up and clipping

def test_guide_warmup_trains_the_guide_alone_then_algorithm_1(tmp_path, monkeypatch):
    """During --guide-warmup the target is untouched (weights, BatchNorm statistics, no momentum) while the
    guide learns; then Algorithm 1 runs with the paper's switches counted after the warm-up."""
    snapshots = []
    calls = spy_steps(monkeypatch, after=lambda call: snapshots.append((
        copy.deepcopy(call["target"].state_dict()), copy.deepcopy(call["guide"].state_dict()),
        any(p in call["optimizer"].state for p in call["target"].parameters()))))
    assert dynat.main(["--dataset", "synthetic", "--train-size", "160", "--batch-size", "32", "--epochs", "3",
                       "--guide-warmup", "1", "--awp", "--awp-warmup", "2", "--out-dir", str(tmp_path / "run"),
                       *TINY]) == 0
    guide_only = [c["guide_only"] for c in calls]
    assert guide_only == [True] * 5 + [False] * 15  # epoch 1 is the guide's, then 3 epochs of Algorithm 1
    torch.manual_seed(0)  # dynat.py's initial weights: --seed 0, target built first
    initial = dynat.models.build_model("wrn-10-1", 10).state_dict()
    for target_state, _, has_momentum in snapshots[:5]:
        assert all(torch.equal(v, initial[k]) for k, v in target_state.items()) and not has_momentum
    assert not all(torch.equal(v, snapshots[0][1][k]) for k, v in snapshots[4][1].items())  # the guide learned
    assert not all(torch.equal(v, initial[k]) for k, v in snapshots[5][0].items())  # then the target does
    assert [c["cfg"].awp for c in calls[5::5]] == [False, True, True]  # --awp-warmup 2: the paper's 2nd epoch


def test_guide_warmup_epochs_come_before_the_papers_schedule(tmp_path):
    """The warm-up adds epochs: the target still gets the whole schedule."""
    out = tmp_path / "run"
    assert dynat.main(["--dataset", "synthetic", "--epochs", "3", "--guide-warmup", "2", "--dry-run",
                       "--batch-size", "16", "--out-dir", str(out), *TINY]) == 0
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["target_trained"] for r in rows] == [False, False, True, True, True]
    assert [r["lr"] for r in rows] == pytest.approx([0.02, 0.1, 0.02, 0.1, 0.001])  # guide's warm start, paper's


def test_guide_warmup_needs_a_guide(tmp_path, capsys):
    rc = dynat.main(["--dataset", "synthetic", "--epochs", "3", "--out-dir", str(tmp_path / "x"), "--labels", "true",
                     "--guide-warmup", "1"])
    assert rc == 2 and "--guide-warmup 1 needs a guide" in capsys.readouterr().err


def test_target_clip_clips_the_targets_gradient_in_its_first_epochs_only(tmp_path, monkeypatch):
    norms = []
    norm = lambda ps: torch.cat([p.grad.flatten() for p in ps if p.grad is not None] or [torch.zeros(1)]).norm()
    spy_steps(monkeypatch, after=lambda call: norms.append(
        (norm(call["target"].parameters()).item(), norm(call["guide"].parameters()).item())))  # what SGD used
    assert dynat.main(["--dataset", "synthetic", "--batch-size", "32", "--epochs", "5", "--guide-warmup", "1",
                       "--target-clip", "0.01", "--target-clip-epochs", "2", "--dry-run",
                       "--out-dir", str(tmp_path / "run"), *TINY]) == 0
    assert norms[0][0] == 0  # guide warm-up: no target gradient
    assert norms[1][0] <= 0.01 * 1.001 and norms[2][0] <= 0.01 * 1.001  # the target's first two epochs: clipped
    assert norms[3][0] > 0.05 and norms[4][0] > 0.05  # then free
    assert all(guide > 0.05 for _, guide in norms)  # the guide is never clipped


def test_sat_keeps_every_images_targets_from_its_start_epoch_on_and_in_last_pt(tmp_path, monkeypatch):
    """SAT's targets (N x C, one-hot at first) are the loop's: untouched before --sat-start, then each step's
    rows move towards the clean predictions; last.pt keeps them for a resume."""
    seen = []
    spy_steps(monkeypatch, after=lambda call: seen.append(None if call["soft_labels"] is None else
                                                         call["soft_labels"].clone()))
    out = tmp_path / "run"
    assert dynat.main(["--dataset", "synthetic", "--train-size", "160", "--batch-size", "32", "--epochs", "2",
                       "--labels", "true", "--loss", "trades", "--alpha", "6", "--sat", "--sat-start", "2",
                       "--no-clean-bn", "--out-dir", str(out), *TINY]) == 0
    assert seen[:5] == [None] * 5 and all(s is not None for s in seen[5:])  # epoch 1: plain TRADES
    soft = seen[-1]
    assert soft.shape == (160, 10) and torch.allclose(soft.sum(1), torch.ones(160))
    assert (soft.max(1).values < 1).all()  # every image was in a batch of epoch 2: all moved from one-hot
    assert torch.equal(torch.load(out / "last.pt", weights_only=True)["sat_soft_labels"], soft)


def test_ema_averages_the_targets_weights_leaves_its_training_alone_and_is_evaluated(tmp_path, monkeypatch):
    """--ema: after each of the target's steps p_ema <- d p_ema + (1 - d) p with d = min(decay, (1 + t) / (10 + t))
    (none during the guide's warm-up), BatchNorm statistics the target's; the target trains bitwise as without
    it; each metrics row has the EMA's clean and PGD-10 accuracy; last.pt holds it."""
    argv = ["--dataset", "synthetic", "--train-size", "160", "--batch-size", "32", "--epochs", "2", "--inner",
            "--guide-warmup", "1", "--deterministic", *TINY]
    assert dynat.main(argv + ["--out-dir", str(tmp_path / "plain")]) == 0
    states = []
    spy_steps(monkeypatch, after=lambda call: states.append((copy.deepcopy(call["target"].state_dict()),
                                                              None if call["ema"] is None else call["ema"][1])))
    assert dynat.main(argv + ["--ema", "0.9", "--out-dir", str(tmp_path / "ema")]) == 0
    plain, ema = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("plain", "ema"))
    assert all(torch.equal(v, plain["target"][k]) for k, v in ema["target"].items())  # the target: untouched by --ema
    decays = [d for _, d in states]
    assert decays[:5] == [None] * 5 and decays[5:] == [min(0.9, (1 + t) / (10 + t)) for t in range(10)]
    torch.manual_seed(0)
    average = {k: v.clone() for k, v in dynat.models.build_model("wrn-10-1", 10).state_dict().items()}
    for state, d in states[5:]:  # the recurrence by hand, in the order of the steps
        for k, v in state.items():
            average[k] = d * average[k] + (1 - d) * v if "running" not in k and "num_batches" not in k else v
    for k, v in ema["ema"].items():
        torch.testing.assert_close(v, average[k], rtol=1e-5, atol=1e-6, msg=k)
    assert ema["ema_steps"] == 10 and plain["ema"] is None
    with open(tmp_path / "ema" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert all(isinstance(r["ema_clean_acc"], float) and isinstance(r["ema_pgd_acc"], float) for r in rows)
    assert rows[-1]["pgd_norm"] == "linf"


# ----------------------------------------------------------------------------- collapse detection

class ChannelGuide(nn.Module):
    """Classifies the test ImageFolder by its dominant colour channel: near-perfect dynamic labels from the start."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return self.scale * x.mean((2, 3))


def run_with_guide(tmp_path, monkeypatch, capsys, dead_target, extra=()):
    ours = dynat.models
    real = ours.build_model

    def build(name, classes):
        if name == "resnet18":  # the guide below
            return ChannelGuide()
        model = real(name, classes)
        if dead_target:  # every final ReLU input far below 0: constant logits, and no gradient ever revives it
            with torch.no_grad():
                model.bn1.weight.zero_()
                model.bn1.bias.fill_(-1000.0)
        return model
    monkeypatch.setattr(ours, "build_model", build)
    folder = make_imagefolder(tmp_path / "data", classes=3, train_per_class=32, test_per_class=16)
    out = tmp_path / "run"
    rc = dynat.main(["--dataset", "imagefolder", "--data-dir", folder, "--target", "wrn-10-1", "--guide", "resnet18",
                     "--batch-size", "16", "--epochs", "4", "--num-steps", "2", "--lr", "0.05", "--eval-pgd-n", "16",
                     "--workers", "0", "--device", "cpu", "--out-dir", str(out), *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f], captured.err


def test_a_dead_target_is_warned_about_once(tmp_path, monkeypatch, capsys):
    rows, err = run_with_guide(tmp_path, monkeypatch, capsys, dead_target=True)
    assert [r["target_pred_classes"] for r in rows] == [1, 1, 1, 1]
    assert all(r["guide_pred_classes"] == 3 and r["dynamic_label_acc"] > 0.9 for r in rows)
    assert err.count("warning:") == 1 and "is dead" in err and "--guide-warmup 14" in err  # 6 steps per epoch
    assert [bool(r["warning"]) for r in rows] == [False, True, False, False]  # its second epoch, once


@pytest.mark.parametrize("extra,warned_at", [(("--guide-warmup", "1"), 3),
                                             (("--target-clip", "0.5", "--target-clip-epochs", "2"), 4)])
def test_the_warning_waits_for_the_warm_up_and_the_clipped_epochs(tmp_path, monkeypatch, capsys, extra, warned_at):
    """The target is judged from its second unhindered epoch: a clipped target is slow on purpose."""
    rows, err = run_with_guide(tmp_path, monkeypatch, capsys, dead_target=True, extra=extra)
    assert [r["epoch"] for r in rows if r["warning"]] == [warned_at] and err.count("warning:") == 1


def test_a_healthy_target_gets_no_warning(tmp_path, monkeypatch, capsys):
    rows, err = run_with_guide(tmp_path, monkeypatch, capsys, dead_target=False)
    assert "warning:" not in err and not any(r["warning"] for r in rows)
    assert rows[-1]["target_pred_classes"] > 1 and rows[-1]["target_clean_acc"] > 0.5


# ----------------------------------------------------------------------------- --resume

def test_resume_refuses_flags_that_would_change_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert dynat.main(["--dataset", "synthetic", "--epochs", "1", "--dry-run", "--batch-size", "16",
                       "--out-dir", str(out), *TINY]) == 0
    capsys.readouterr()
    rc = dynat.main(["--resume", str(out), "--epochs", "4", "--lr", "0.05", "--seed", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--epochs 4 (the run has 1: the lr milestones" in err and "--lr 0.05 (the run has 0.1" in err
    assert "--seed" not in err  # given, but the run's own value
    # a finished run says so instead of silently doing nothing
    assert dynat.main(["--resume", str(out)]) == 0
    assert "already finished its 1 epoch: nothing to do" in capsys.readouterr().out
    # what a resume may change is taken from the command line; the rest from the run
    argv = ["--resume", str(out), "--eval-every", "3", "--data-dir", "/elsewhere"]
    resumed, _ = dynat_runs.resolve_resume(dynat.get_parser().parse_args(argv), argv, dynat.get_parser)
    assert resumed.eval_every == 3 and resumed.data_dir == "/elsewhere" and resumed.dataset == "synthetic"
    assert resumed.batch_size == 16 and resumed.epochs == 1


def test_a_resume_keeps_the_runs_device_and_precision_unless_told(tmp_path):
    """`--amp auto` is recorded as what it resolved to, and --device/--workers default to the run's own:
    a plain resume on another machine does not switch the run to another device or precision."""
    out = tmp_path / "run"
    assert dynat.main(["--dataset", "synthetic", "--epochs", "1", "--dry-run", "--batch-size", "16",
                       "--out-dir", str(out), *TINY]) == 0
    with open(out / "args.json") as f:
        assert json.load(f)["amp"] == "none"  # auto, on a CPU
    argv = ["--resume", str(out)]
    resumed, _ = dynat_runs.resolve_resume(dynat.get_parser().parse_args(argv), argv, dynat.get_parser)
    assert (resumed.device, resumed.workers, resumed.amp) == ("cpu", 0, "none")
    argv += ["--device", "cuda", "--workers", "3"]
    resumed, _ = dynat_runs.resolve_resume(dynat.get_parser().parse_args(argv), argv, dynat.get_parser)
    assert (resumed.device, resumed.workers, resumed.amp) == ("cuda", 3, "none")


def test_a_short_schedule_and_fp16_on_a_cpu_are_said_at_start_up(tmp_path, capsys):
    """--epochs 2 never reaches the full lr (0.2x, then x0.01): said in one line; fp16 on a CPU, likewise."""
    assert dynat.main(["--dataset", "synthetic", "--epochs", "2", "--dry-run", "--batch-size", "16", "--amp", "fp16",
                       "--out-dir", str(tmp_path / "a"), *TINY]) == 0
    out = capsys.readouterr().out
    assert "never trains at the full --lr" in out and "--amp fp16 has no fast kernels on a CPU" in out
    assert dynat.main(["--dataset", "synthetic", "--epochs", "4", "--dry-run", "--batch-size", "16",
                       "--out-dir", str(tmp_path / "b"), *TINY]) == 0
    assert "note:" not in capsys.readouterr().out  # 4 epochs: epochs 2 and 3 at the full lr


# ----------------------------------------------------------------------------- data

def write_idx(path, array):
    """An idx file in the original MNIST format, gzipped: magic (0, 0, 0x08 = ubyte, ndim), big-endian sizes, data."""
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("dataset,folder", [("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_mnist_format_files_train_one_step(tmp_path, dataset, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = dynat.data.load_data(dataset, str(tmp_path))
    x, y = data["train"]
    assert x.shape == (40, 3, 28, 28) and x.dtype == torch.uint8 and data["classes"] == 10
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey as 3 channels
    assert y.tolist() == [i % 10 for i in range(40)] and data["test"][0].shape == (20, 3, 28, 28)
    assert dynat.main(["--dataset", dataset, "--data-dir", str(tmp_path), "--epochs", "1", "--dry-run",
                       "--batch-size", "8", "--out-dir", str(tmp_path / "run"), *TINY]) == 0


def test_mnist_files_extracted_by_two_runs_at_once(tmp_path, monkeypatch):
    """Several seeds started at once on a fresh folder all extract the same .gz files: a second extraction
    that runs while the first is half-way must not make the first fail (it did when both used one part file)."""
    import shutil
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 20), ("t10k", 10)):
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    copy, interleaved = shutil.copyfileobj, []

    def copy_with_another_run_in_between(src, dst):
        if not interleaved:  # the other run extracts everything while this one is between open and copy
            interleaved.append(None)
            interleaved[0] = dynat.data.load_data("fashion-mnist", str(tmp_path))
        copy(src, dst)
    monkeypatch.setattr(shutil, "copyfileobj", copy_with_another_run_in_between)
    data = dynat.data.load_data("fashion-mnist", str(tmp_path))
    assert interleaved and torch.equal(data["train"][1], interleaved[0]["train"][1])
    assert sorted(p.name for p in raw.iterdir() if p.suffix == ".part") == []


@pytest.mark.parametrize("fault", ["half an archive", "flipped bytes", "not a gzip", "empty", "no space left"])
def test_mnist_extraction_failure_names_its_cause(tmp_path, monkeypatch, capsys, fault):
    """A broken .gz is bad input, named as broken (copy it again: exit 2); a folder that cannot take the extracted
    file is named with the system's reason, not as a broken archive the user would delete (exit 1, as any write
    that fails). Nothing half-written stays."""
    import errno
    import shutil
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 20), ("t10k", 10)):
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    gz = raw / "train-images-idx3-ubyte.gz"
    packed = gzip.compress(gzip.decompress(gz.read_bytes()), mtime=0)  # a 10-byte header, an 8-byte trailer
    if fault == "half an archive":  # EOFError
        gz.write_bytes(packed[:len(packed) // 2])
    elif fault == "flipped bytes":  # inside the deflate stream: zlib's error, not gzip's
        gz.write_bytes(packed[:10] + bytes(b ^ 0x5A for b in packed[10:-8]) + packed[-8:])
    elif fault == "not a gzip":  # gzip.BadGzipFile, an OSError that is the archive's fault
        gz.write_bytes(b"<html>not found</html>")
    elif fault == "empty":  # gzip reads it as empty data, without an error
        gz.write_bytes(b"")
    else:
        def full_disk(src, dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(shutil, "copyfileobj", full_disk)
    rc = dynat.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"),
                     *TINY])
    message = capsys.readouterr().err.strip()
    assert str(gz) in message and "\n" not in message
    if fault != "no space left":
        assert rc == 2 and "not a valid gzip file" in message
    else:
        assert rc == 1 and "not a valid gzip" not in message and "No space left" in message
    assert [p.name for p in raw.iterdir() if not p.name.endswith(".gz")] == []


def test_missing_mnist_files_say_what_to_put_where(tmp_path, monkeypatch, capsys):
    import torchvision

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:")
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    assert dynat.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"),
                       *TINY]) == 2
    message = capsys.readouterr().err.strip()
    assert f"{tmp_path}/FashionMNIST/raw/" in message and "train-images-idx3-ubyte.gz" in message
    assert "/usr/share/datasets/fashion-mnist" in message and "\n" not in message


def test_corrupt_cifar_archive_is_named_as_corrupt(tmp_path, monkeypatch):
    import torchvision
    data = dynat.data
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"half a download")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: pytest.fail("must not download"))
    with pytest.raises(ValueError) as e:
        data.load_data("cifar10", str(tmp_path))
    assert "is there but fails its MD5 checksum" in str(e.value) and "delete it" in str(e.value)
    # a half-extracted folder (and no archive): named as incomplete, not as missing
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"truncated")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: (_ for _ in ()).throw(RuntimeError("offline")))
    with pytest.raises(ValueError) as e:
        data.load_data("cifar10", str(tmp_path))
    assert "cifar-10-batches-py is incomplete or corrupt" in str(e.value)
