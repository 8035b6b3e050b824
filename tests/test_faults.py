"""Faults a long run meets, one at a time: nothing lost, nothing silent.

Each test injects one fault into short synthetic runs (in this process, so a fault can be a monkeypatched
write): a run interrupted and relaunched with the same command, a second process in a live run's out-dir,
bytes changed inside a checkpoint, a weight that became inf, a disk that fills, an out-dir that cannot be
written, unreadable data, a torn metrics line, a dead writer's temp file, a second SIGTERM. The elastic
restart under torchrun is in test_scripts.py (two processes).
"""
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dynat
import dynat_runs
import evaluate
from test_scripts import ROOT, assert_same_weights, make_imagefolder, metrics

RUN = ["--dataset", "synthetic", "--train-size", "64", "--batch-size", "32", "--epochs", "2", "--deterministic",
       "--target", "wrn-10-1", "--guide", "wrn-10-1", "--num-steps", "1", "--eval-pgd-n", "8", "--workers", "0",
       "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread_and_signals")  # conftest.py


def train(capsys, *argv):
    rc = dynat.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def evaluate_(capsys, *argv):
    rc = evaluate.main([str(a) for a in argv] + ["--workers", "0", "--device", "cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err):
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def at_step(monkeypatch, n, action):
    """Call action(call) right after the n-th training step (1-based) of the next run in this process."""
    real, count = dynat.train_step, [0]

    def train_step(target, guide, *args, **kw):
        values = real(target, guide, *args, **kw)
        count[0] += 1
        if count[0] == n:
            action(target)
        return values
    monkeypatch.setattr(dynat, "train_step", train_step)


# ----------------------------------------------------------------------------- one command starts or continues

def test_resume_auto_starts_a_run_then_continues_it_exactly_and_refuses_another_runs_dir(tmp_path, capsys,
                                                                                          monkeypatch):
    """--resume auto: the same command starts the run, and relaunched after an interruption continues it bitwise
    (as torchrun's elastic agent or a requeue would relaunch it); a command that is not the run's is refused.
    On the way: a dead writer's temp file is removed and a torn last line of metrics.jsonl cut off."""
    full, out = tmp_path / "full", tmp_path / "run"
    assert train(capsys, *RUN, "--out-dir", full)[0] == 0
    command = [*RUN, "--out-dir", out, "--resume", "auto"]
    with monkeypatch.context() as m:  # SIGTERM after the first step of epoch 2
        at_step(m, 3, lambda target: os.kill(os.getpid(), signal.SIGTERM))
        rc, stdout, _ = train(capsys, *command)
    assert rc == 128 + signal.SIGTERM and "resumed" not in stdout
    (out / "last.pt.tmp999999999").write_bytes(b"half a checkpoint")  # a writer killed mid-write
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 0.0')  # a row torn by a kill or a full disk
    rc, stdout, err = train(capsys, *command)
    assert rc == 0, err
    assert "resumed" in stdout and not list(out.glob("*.tmp*"))
    assert metrics(out) == metrics(full)
    assert_same_weights(full / "last.pt", out / "last.pt")
    # another run's command, or an out-dir that holds something else, is refused in one line
    for argv, reason in (([*command, "--seed", "1"], "--seed 1 (the run has 0"),
                         ([*command, "--inner"], "--inner True (the run has False")):
        rc, _, err = train(capsys, *argv)
        assert rc == 2 and one_line(err) and reason in err, err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    rc, _, err = train(capsys, *RUN, "--out-dir", tmp_path / "other", "--resume", "auto")
    assert rc == 2 and one_line(err) and "not empty" in err


# ----------------------------------------------------------------------------- an out-dir belongs to one live run

def test_a_live_runs_out_dir_is_refused_to_every_other_process_and_a_dead_ones_is_not(tmp_path, capsys):
    out, live = tmp_path / "run", [*RUN, "--epochs", "100"]
    proc = subprocess.Popen([sys.executable, "dynat.py", *live, "--out-dir", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        while not (out / "last.pt").exists():
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        for argv in ([*RUN, "--out-dir", out, "--overwrite"], [*live, "--out-dir", out, "--resume", "auto"],
                     ["--resume", out]):
            rc, _, err = train(capsys, *argv)
            assert rc == 2 and one_line(err) and f"in use by a live process (pid {proc.pid}" in err, err
        rc, _, err = evaluate_(capsys, out / "last.pt", "--attacks", "clean", "--out-dir", out)
        assert rc == 2 and one_line(err) and "in use by a live process" in err, err
    finally:
        proc.kill()
        proc.wait()
    assert (out / dynat_runs.LOCK).exists()  # left behind by the killed run: it blocks nothing
    rc, _, err = evaluate_(capsys, out / "last.pt", "--attacks", "clean", "--out-dir", out)
    assert rc == 0, err


# ----------------------------------------------------------------------------- checkpoints prove they are whole

def test_a_checkpoint_whose_bytes_changed_is_refused_by_resume_and_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, *RUN, "--epochs", "1", "--val-size", "32", "--out-dir", out)[0] == 0
    for name in ("last.pt", "best.pt"):
        path = out / name
        data, weight = path.read_bytes(), torch.load(path, weights_only=True)["target"]["fc.weight"]
        at = data.index(weight.numpy().tobytes())  # the tensor's bytes, stored uncompressed in the zip
        path.write_bytes(data[:at] + bytes(64) + data[at + 64:])
        changed = torch.load(path, weights_only=True)  # torch itself loads it without a word ...
        assert not torch.equal(changed["target"]["fc.weight"], weight)
    rc, _, err = train(capsys, "--resume", out)  # ... we do not
    assert rc == 2 and one_line(err) and f"{out / 'last.pt'}: corrupt" in err and "SHA-256" in err, err
    for name in ("last.pt", "best.pt"):
        rc, _, err = evaluate_(capsys, out / name, "--attacks", "clean", "--out-dir", tmp_path / f"eval_{name}")
        assert rc == 2 and one_line(err) and f"{out / name}: corrupt" in err, err


def test_an_args_json_that_is_not_json_is_refused_by_resume_in_one_line(tmp_path, capsys):
    """Before its first last.pt a run is resumed from args.json; bytes there that are not JSON are refused by name."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_bytes(b'{"epochs": 1, "see')
    for argv in (["--resume", str(out)], [*RUN, "--resume", "--out-dir", str(out)]):
        rc, _, err = train(capsys, *argv)
        assert rc == 2 and one_line(err) and f"{out / 'args.json'}: not the JSON dynat.py writes" in err, err


def test_non_finite_weights_are_never_saved_and_never_evaluated(tmp_path, capsys, monkeypatch):
    """A BatchNorm running variance becomes inf while every loss stays finite (--lr 1e6 did that): the run stops
    in one line naming it, last.pt keeps the previous epoch; evaluate.py refuses such weights."""
    out = tmp_path / "run"
    poison = lambda target: target.block1.layer[0].bn2.running_var.fill_(float("inf"))
    with monkeypatch.context() as m:
        at_step(m, 4, poison)  # the last step of epoch 2
        rc, _, err = train(capsys, *RUN, "--out-dir", out)
    assert rc == 1 and one_line(err), err
    assert "target.block1.layer.0.bn2.running_var holds inf or nan: not saved" in err
    assert f"{out / 'last.pt'} keeps the last good state" in err
    ckpt = dynat_runs.load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and dynat_runs.first_nonfinite(ckpt) is None
    poison_state = {k: v for k, v in ckpt.items()}
    poison_state["target"]["bn1.running_var"][0] = float("nan")
    torch.save(poison_state, tmp_path / "nan.pt")  # written by hand: no SHA-256 to check
    rc, _, err = evaluate_(capsys, tmp_path / "nan.pt", "--attacks", "clean", "--out-dir", tmp_path / "eval")
    assert rc == 2 and one_line(err) and "bn1.running_var holds inf or nan" in err, err


# ----------------------------------------------------------------------------- a disk that fills

def test_a_full_disk_keeps_the_last_checkpoint_and_a_resume_checks_the_space_first(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save, saved = torch.save, []

    class FullDisk:  # a file on a disk that fills after 100 kB; torch.save's writer wraps the OSError
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            self.written += len(b)
            if self.written > 100_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

    def save(obj, f, *a, **kw):  # the 2nd checkpoint (epoch 2's last.pt): the disk fills half-way through it
        if isinstance(obj, dict) and "optimizer" in obj:
            saved.append((out / "last.pt").read_bytes() if saved else None)
            if len(saved) == 2:
                return real_save(obj, FullDisk(f), *a, **kw)
        return real_save(obj, f, *a, **kw)
    with monkeypatch.context() as m:
        m.setattr(torch, "save", save)
        rc, _, err = train(capsys, *RUN, "--out-dir", out)
    assert rc == 1 and one_line(err), err
    assert f"{out / 'last.pt'}: No space left on device while writing it; the previous one is kept" in err
    assert (out / "last.pt").read_bytes() == saved[1] and not list(out.glob("*.tmp*"))
    # a resume on a disk still full stops before it trains, and rewrites nothing
    files = lambda: {p.name: p.read_bytes() for p in out.iterdir() if p.name != dynat_runs.LOCK}
    before = files()
    with monkeypatch.context() as m:
        m.setattr(dynat_runs.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
        rc, _, err = train(capsys, "--resume", out)
    assert rc == 1 and one_line(err) and "MiB free" in err and "last.pt" in err, err
    assert files() == before
    rc, stdout, err = train(capsys, "--resume", out)  # space freed: it goes on
    assert rc == 0 and "resumed" in stdout, err


def test_an_interrupt_while_a_write_fails_stays_an_interrupt(tmp_path):
    """A signal (KeyboardInterrupt, StopNow) raised while a full disk's OSError is being handled is still the
    signal: the run stops with its code, not as a failed write; the temp file goes either way."""
    def write(f):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        dynat_runs.write_atomic(str(tmp_path / "last.pt"), write)
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_drawing_the_curves_keeps_the_previous_picture(tmp_path, capsys, monkeypatch):
    import matplotlib.figure
    out, real, pictures = tmp_path / "run", matplotlib.figure.Figure.savefig, []

    def savefig(fig, fname, *a, **kw):  # epoch 2's curves.png: the disk fills after its first bytes
        pictures.append((out / "curves.png").read_bytes() if pictures else None)
        if len(pictures) == 2:
            with open(fname, "wb") if isinstance(fname, (str, os.PathLike)) else contextlib.nullcontext(fname) as f:
                f.write(b"\x89PNG")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fig, fname, *a, **kw)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    rc, _, err = train(capsys, *RUN, "--out-dir", out)
    assert rc == 1 and one_line(err) and f"{out / 'curves.png'}: No space left on device" in err, err
    assert (out / "curves.png").read_bytes() == pictures[1] and not list(out.glob("*.tmp*"))
    assert dynat_runs.load_checkpoint(out / "last.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- out-dirs and data that cannot be used

def test_an_out_dir_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys, monkeypatch):
    folder = make_imagefolder(tmp_path / "images", classes=2, train_per_class=4, test_per_class=2, size=8)
    run = tmp_path / "run"
    assert train(capsys, *RUN, "--epochs", "1", "--out-dir", run)[0] == 0
    file = tmp_path / "file"
    file.write_text("not a directory")
    for rc, err in (train(capsys, *RUN, "--out-dir", file)[::2], train(capsys, *RUN, "--out-dir", file, "--resume",
                                                                        "auto")[::2],
                    train(capsys, "--resume", file)[::2],
                    evaluate_(capsys, run / "last.pt", "--attacks", "clean", "--out-dir", file)[::2]):
        assert rc == 2 and one_line(err) and str(file) in err, err
    real_open = os.open  # read-only: what a chmod a-w directory gives (root, which CI may be, is never refused)

    def read_only(path, flags, *a, **kw):
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *a, **kw)
    monkeypatch.setattr(os, "open", read_only)
    for rc, err in (train(capsys, "--resume", run)[::2], train(capsys, *RUN, "--out-dir", run / "sub")[::2],
                    evaluate_(capsys, run / "last.pt", "--attacks", "clean", "--out-dir", run / "eval")[::2]):
        assert rc == 2 and one_line(err) and "cannot write there (Permission denied)" in err, err
    monkeypatch.setattr(os, "open", real_open)
    real_scandir = os.scandir  # unreadable training images: what ImageFolder meets in a chmod a-r folder

    def unreadable(path="."):
        if str(path).startswith(os.path.join(folder, "train")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", unreadable)
    rc, _, err = train(capsys, "--dataset", "imagefolder", "--data-dir", folder, *RUN[2:], "--out-dir", tmp_path / "x")
    assert rc == 1 and one_line(err) and "Permission denied" in err, err


# ----------------------------------------------------------------------------- signals

def test_a_second_sigterm_stops_at_once_with_sigterms_exit_code(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    twice = lambda target: [os.kill(os.getpid(), signal.SIGTERM) for _ in range(2)]
    at_step(monkeypatch, 3, twice)  # in epoch 2: epoch 1's last.pt is the last saved state
    rc, _, err = train(capsys, *RUN, "--out-dir", out)
    assert rc == 128 + signal.SIGTERM and one_line(err) and "second signal" in err, err
    assert dynat_runs.load_checkpoint(out / "last.pt")["epoch"] == 1
