"""evaluate.py: robust-accuracy bookkeeping, AutoAttack resume, checkpoint checks, the CLI end to end.

Fast on a CPU: a wrn-10-1 on 8x8 images of 4 classes (a bright quadrant per class) whose last
layer is fitted to the test images, so that it is accurate clean and breaks gradually with epsilon.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pyautoattack
import pyautoattack.autopgd_base
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import dynat
import evaluate
from models import build_model
from test_scripts import this_machine

EPS = "2/255"  # the fixture model: ~94 % clean, ~60 % under PGD-10 at this radius


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (5x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def torch_flags():
    """evaluate.py sets process-wide kernel flags (deterministic, no TF32); other tests get theirs back."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved[:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def checkpoint_args(**flags):
    """dynat.py's args dict for a checkpoint, as dynat.py saves it."""
    argv = [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return vars(dynat.get_parser().parse_args(argv))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageFolder of 8x8 images (64 test, 4 train) and a dynat.py checkpoint of a fitted wrn-10-1."""
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 1), ("test", 16)):
        for k in range(4):
            os.makedirs(root / split / f"c{k}")
            for i in range(per_class):
                img = 0.3 + 0.4 * torch.rand(8, 8, 3, generator=g)
                r, c = divmod(k, 2)
                img[4 * r:4 * r + 4, 4 * c:4 * c + 4] += 0.1
                Image.fromarray((255 * img).round().byte().numpy()).save(root / split / f"c{k}" / f"{i}.png")
    x_u8, y = dynat.data.load_data("imagefolder", str(root), 0)["test"]
    x = x_u8.float() / 255
    torch.manual_seed(0)
    model = build_model("wrn-10-1", 4).eval()
    # Fit only the last layer on the (fixed) features: a trained-ish model in a fraction of a second.
    feats = []
    hook = model.fc.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    fc = torch.nn.Linear(feats[0].shape[1], 4)
    opt = torch.optim.Adam(fc.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(fc(feats[0]), y).backward()
        opt.step()
    model.fc.load_state_dict(fc.state_dict())
    path = root / "ckpt.pt"
    torch.save({"target": model.state_dict(), "guide": None, "classes": 4,
                "args": checkpoint_args(dataset="imagefolder", data_dir=root, target="wrn-10-1", labels="true")}, path)
    return {"root": root, "ckpt": path, "model": model, "x": x, "y": y}


@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory):
    """A dynat.py checkpoint (target and guide) for the built-in 32x32 synthetic dataset."""
    torch.manual_seed(0)
    target, guide = build_model("wrn-10-1", 10), build_model("wrn-10-1", 10)
    path = tmp_path_factory.mktemp("synthetic") / "last.pt"
    torch.save({"target": target.state_dict(), "guide": guide.state_dict(), "classes": 10,
                "args": checkpoint_args(dataset="synthetic", target="wrn-10-1", guide="wrn-10-1")}, path)
    return path


def run_eval(capsys, *argv):
    rc = evaluate.main([str(a) for a in argv] + ["--workers", "0"])
    out, err = capsys.readouterr()
    return rc, out, err


def outputs(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    with np.load(os.path.join(out_dir, "per_example.npz")) as f:
        arrays = {k: f[k] for k in f.files}
    return results, arrays


def assert_usage_error(rc, err):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("evaluate.py: error:"), err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- attacks


def test_cw_is_pgd_on_the_margin_loss(folder, capsys, tmp_path, monkeypatch):
    # logits (1, 3, 2): for y = 0 the margin loss is -(1 - 3) = 2, for y = 1 it is -(3 - 2) = -1.
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    assert dynat.margin_loss(logits, torch.tensor([0, 1])).tolist() == [2.0, -1.0]
    calls = []
    real = dynat.perturb
    monkeypatch.setattr(dynat, "perturb", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    rc, _, _ = run_eval(capsys, folder["ckpt"], "--attacks", "cw3,pgd2", "--epsilon", "0.031", "--n", "8",
                        "--out-dir", tmp_path)
    assert rc == 0 and calls
    cw, pgd = [c for c in calls if c["num_steps"] == 3], [c for c in calls if c["num_steps"] == 2]
    assert cw and all(c["loss"] == "cw" and c["start"] == "uniform" and c["epsilon"] == 0.031
                      and c["step_size"] == 2 / 255 for c in cw)
    assert pgd and all(c["loss"] == "ce" and c["start"] == "uniform" for c in pgd)


def test_more_steps_only_add_points_broken_at_some_iterate(folder):
    """With a fixed seed, adding PGD steps can only grow the set of points misclassified at *some* iterate.

    Why not "PGD-20 accuracy <= PGD-10 accuracy" on evaluate.py's numbers: PGD reports its last
    iterate. Under the same seed PGD-K2 starts where PGD-K1 started and passes through PGD-K1's
    final point, but later iterates can climb back into the correct class, so last-iterate accuracy
    is not monotone in K, per example or on average (a random wrn-10-1 on the synthetic set scored
    1.00 % under PGD-50, 0.50 % under PGD-20). What is guaranteed is the worst case over the
    iterates, because the first K1 + 1 iterates of both runs coincide. perturb's kappa counts the
    iterates 0..K-1 still classified as y; the last one is checked here. This fails if the random
    start or the steps are not reproducible from the seed.
    """
    model, x, y = folder["model"], folder["x"], folder["y"]
    broken = {}
    for k in (2, 5, 12):
        torch.manual_seed(0)
        x_adv, kappa = dynat.perturb(model, x, y, epsilon=2 / 255, step_size=0.5 / 255, num_steps=k,
                                     loss="ce", start="uniform")
        with torch.no_grad():
            broken[k] = (kappa < k) | (model(x_adv).argmax(1) != y)
    assert not (broken[2] & ~broken[5]).any() and not (broken[5] & ~broken[12]).any()
    assert 0 < broken[2].sum() < broken[12].sum() < len(y)  # the setting is not degenerate


def test_accuracies_bounded_by_clean_and_worst_case(folder, capsys, tmp_path):
    rc, out, _ = run_eval(capsys, folder["ckpt"], "--epsilon", EPS, "--n", "40", "--attacks", "cw3,pgd3,apgd-ce",
                          "--out-dir", tmp_path)
    assert rc == 0 and "first 40 of 64 test images" in out
    results, arrays = outputs(tmp_path)
    clean, attacks = arrays["clean"], [a for a in arrays if a not in ("clean", "worst")]

    # --n: the first n images, stated in the results; every array has n entries.
    assert results["n"] == 40 and results["n_test"] == 64
    assert all(a.shape == (40,) and a.dtype == bool for a in arrays.values())
    with torch.no_grad():
        expected = (folder["model"](folder["x"][:40]).argmax(1) == folder["y"][:40]).numpy()
    assert (clean == expected).all() and results["accuracy"]["clean"] == pytest.approx(expected.mean())

    # A point is robust only if it is also correct clean; the attacks do break points.
    for a in attacks:
        assert not (arrays[a] & ~clean).any() and results["accuracy"][a] == pytest.approx(arrays[a].mean())
    assert results["accuracy"]["pgd3"] < results["accuracy"]["clean"]

    # Worst case = per-example AND over every attack run, <= each attack; All = mean over the attacks.
    assert sorted(attacks) == ["apgd-ce", "cw3", "pgd3"]
    assert (arrays["worst"] == np.logical_and.reduce([arrays[a] for a in attacks])).all()
    assert results["worst"] == pytest.approx(arrays["worst"].mean())
    assert results["worst"] <= min(results["accuracy"][a] for a in attacks)
    assert results["all"] == pytest.approx(np.mean([results["accuracy"][a] for a in attacks]))


def test_attacks_are_reseeded_and_restarts_only_remove_points(folder, capsys, tmp_path):
    # Two steps of 1/255 in an 8/255 ball: the random start decides about a fifth of the points.
    common = [folder["ckpt"], "--epsilon", "8/255", "--step-size", "1/255", "--n", "40", "--seed", "3"]
    flags = {}
    for name, argv in {"after_cw": ["--attacks", "cw2,pgd2"], "alone": ["--attacks", "pgd2"],
                       "restarts": ["--attacks", "pgd2", "--restarts", "2"]}.items():
        assert run_eval(capsys, *common, *argv, "--out-dir", tmp_path / name)[0] == 0
        flags[name] = outputs(tmp_path / name)[1]["pgd2"]
    # Each attack is reseeded: its flags do not depend on what ran before it.
    assert (flags["after_cw"] == flags["alone"]).all()
    # So the first of two restarts repeats the single-start run exactly, and the second can only
    # remove robust points (here it does remove some).
    assert not (flags["restarts"] & ~flags["alone"]).any() and flags["restarts"].sum() < flags["alone"].sum()


# ----------------------------------------------------------------------------- AutoAttack


def test_autoattack_interrupted_twice_gives_the_uninterrupted_flags(folder, capsys, tmp_path, monkeypatch):
    """AA through evaluate.py, stopped by Ctrl-C in APGD-CE's second batch and again when APGD-T
    starts, resumed each time: the flags equal those of one uninterrupted standard call of the
    library, after the first stage and at the end."""
    # 8 points in batches of 3 at eps 5/255: APGD-CE leaves one point, APGD-T breaks it, so the
    # expensive FAB-T and Square stages find nothing to attack.
    common = [folder["ckpt"], "--epsilon", "5/255", "--n", "8", "--batch-size", "3", "--attacks", "aa"]
    x, y = folder["x"][:8], folder["y"][:8]
    reference = {}
    for name in ("apgd-ce", "aa"):
        adversary = pyautoattack.AutoAttack(folder["model"], norm="Linf", eps=5 / 255, version="standard", seed=0,
                                            device="cpu")
        if name != "aa":
            adversary.attacks_to_run = [name]
        adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = 3  # 4 classes
        reference[name] = (adversary.run_standard_evaluation(x, y, batch_size=3)[1] == y).tolist()
    assert 0 < sum(reference["apgd-ce"]) < 8  # not degenerate

    def count_calls(m, cls, interrupt_at=None, after=0.0):
        """Patch cls.perturb to count its calls (one per batch) and raise KeyboardInterrupt at one, `after` s into it."""
        real, calls = cls.perturb, []

        def perturb(*args, **kwargs):
            calls.append(1)
            if len(calls) == interrupt_at:
                time.sleep(after)
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        m.setattr(cls, "perturb", perturb)
        return calls

    def state():
        with open(tmp_path / "autoattack_aa.json") as f:
            return json.load(f)
    untargeted, targeted = pyautoattack.autopgd_base.APGDAttack, pyautoattack.autopgd_base.APGDAttack_targeted
    with monkeypatch.context() as m:
        count_calls(m, untargeted, interrupt_at=2, after=1.5)
        rc, _, err = run_eval(capsys, *common, "--out-dir", tmp_path)
    assert rc == 130 and "--resume" in err
    assert state()["done"] == [] and len(state()["pending"]) == 5  # the first batch of 3 is done
    assert state()["seconds"] >= 1.5  # and the seconds of the batch it was stopped in are kept
    with monkeypatch.context() as m:
        calls = count_calls(m, untargeted)
        count_calls(m, targeted, interrupt_at=1)
        rc, out, _ = run_eval(capsys, *common, "--out-dir", tmp_path, "--resume")
    assert rc == 130 and f"AA after apgd-ce: {sum(reference['apgd-ce'])}/8 robust" in out  # printed as it ended
    assert len(calls) == 2  # APGD-CE went on with the two batches left, not from the start
    assert state()["done"] == ["apgd-ce"] and state()["robust"] == reference["apgd-ce"]
    # the seconds the interrupted processes spent count in AA's: say they were 1,000 (the file as it is, else)
    assert state()["seconds"] > 0
    (tmp_path / "autoattack_aa.json").write_text(json.dumps(dict(state(), seconds=1000.0)))
    started = time.time()
    rc, out, _ = run_eval(capsys, *common, "--out-dir", tmp_path, "--resume")
    assert rc == 0 and "| AA |" in out and "1000.0 of them before the resume" in out
    results, arrays = outputs(tmp_path)
    assert results["complete"] and arrays["aa"].tolist() == reference["aa"]
    assert 1000 < results["seconds"]["aa"] < 1000 + time.time() - started
    # the robust share after each stage, kept across both interruptions: APGD-CE's is the library's own, and
    # APGD-T broke the last point (so the later stages had nothing to attack)
    after = {"apgd-ce": sum(reference["apgd-ce"]) / 8, **dict.fromkeys(["apgd-t", "fab-t", "square"], 0.0)}
    assert sum(reference["aa"]) == 0 and results["aa_stages"] == after and list(results["aa_stages"]) == list(after)
    assert "AA after square: 0/8 robust" in out
    assert results["accuracy"]["aa"] == pytest.approx(np.mean(reference["aa"]))


def test_autoattack_resumed_in_square_counts_what_square_took_before_the_interruption(folder, capsys, tmp_path):
    """Square's masking warning compares with the count after FAB-T as recorded, not with the count when a resumed
    process started; resuming a state from before the per-stage counts were kept, results.json has no aa_stages."""
    x, y = folder["x"][:8], folder["y"][:8]
    robust = [True] * 4 + [False] * 4  # where the interrupted process left Square: all its batches done
    path = tmp_path / "autoattack_aa.json"
    for after, warned in (({"apgd-ce": 7, "apgd-t": 6, "fab-t": 6}, True), ({"apgd-ce": 7, "apgd-t": 6, "fab-t": 4},
                                                                             False)):
        path.write_text(json.dumps({"done": ["apgd-ce", "apgd-t", "fab-t"], "pending": [], "robust": robust,
                                    "robust_after": after, "seconds": 5.0}))
        flags = evaluate.autoattack(folder["model"], x, y, torch.ones(8, dtype=torch.bool), "aa", norm="linf",
                                    epsilon=2 / 255, seed=0, batch_size=8, device="cpu", classes=4, state_path=path,
                                    progress=lambda total, desc: contextlib.nullcontext(types.SimpleNamespace(
                                        update=lambda k: None)))
        assert flags.tolist() == robust
        assert ("Square broke 2 points" in capsys.readouterr().err) == warned
        assert evaluate.aa_state(path)["robust_after"]["square"] == 4 and evaluate.aa_state(path)["seconds"] >= 5
    # A state without the counts (written before they were kept), resumed to the end: no partial aa_stages
    ckpt = [folder["ckpt"], "--epsilon", "5/255", "--n", "8", "--batch-size", "3", "--attacks", "aa"]
    out_dir = tmp_path / "eval"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pyautoattack.autopgd_base.APGDAttack_targeted, "perturb",
                  lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
        assert run_eval(capsys, *ckpt, "--out-dir", out_dir)[0] == 130
    state = json.loads((out_dir / "autoattack_aa.json").read_text())
    assert state["done"] == ["apgd-ce"]
    del state["robust_after"]
    (out_dir / "autoattack_aa.json").write_text(json.dumps(state))
    assert run_eval(capsys, *ckpt, "--out-dir", out_dir, "--resume")[0] == 0
    assert "aa_stages" not in outputs(out_dir)[0]


def test_resume_keeps_finished_attacks_and_checks_settings(folder, capsys, tmp_path, monkeypatch):
    ckpt, out_dir = tmp_path / "ckpt.pt", tmp_path / "eval"
    ckpt.write_bytes(folder["ckpt"].read_bytes())
    common = [ckpt, "--epsilon", EPS, "--n", "16", "--out-dir", out_dir]
    assert run_eval(capsys, *common, "--attacks", "pgd2")[0] == 0
    first = outputs(out_dir)
    calls = []
    real = dynat.perturb
    monkeypatch.setattr(dynat, "perturb", lambda *a, **kw: calls.append(kw["num_steps"]) or real(*a, **kw))
    assert run_eval(capsys, *common, "--attacks", "pgd2,pgd1", "--resume")[0] == 0
    assert set(calls) == {1}  # PGD-2 was kept, only PGD-1 ran
    second = outputs(out_dir)
    assert (second[1]["pgd2"] == first[1]["pgd2"]).all()
    assert second[0]["seconds"]["pgd2"] == first[0]["seconds"]["pgd2"]
    # A finished one is printed again; refused: other settings, or other weights, with --resume.
    rc, out, _ = run_eval(capsys, *common, "--attacks", "pgd2")
    assert rc == 0 and "already holds this evaluation, finished" in out and "| PGD-1 |" in out
    assert outputs(out_dir)[0]["seconds"] == second[0]["seconds"]
    rc, _, err = run_eval(capsys, *common, "--attacks", "pgd2", "--resume", "--seed", "1")
    assert_usage_error(rc, err)
    assert "seed" in err
    state = torch.load(ckpt, weights_only=True)
    state["target"]["fc.bias"] += 1
    torch.save(state, ckpt)
    rc, _, err = run_eval(capsys, *common, "--attacks", "pgd2", "--resume")
    assert_usage_error(rc, err)
    assert "checkpoint_sha256" in err


def test_a_resumed_evaluation_interrupted_again_keeps_what_it_had_finished(folder, capsys, tmp_path, monkeypatch):
    """PGD-1 finishes, PGD-2 is interrupted; resumed, PGD-2 is interrupted again: PGD-1 stays in results.json
    and per_example.npz, and the third run computes PGD-2 alone, in the table's place of --attacks."""
    common = [folder["ckpt"], "--epsilon", EPS, "--n", "8", "--attacks", "pgd1,pgd2", "--out-dir", tmp_path]
    real, steps = dynat.perturb, []

    def perturb(*a, **kw):
        steps.append(kw["num_steps"])
        if kw["num_steps"] == 2 and interrupt:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(dynat, "perturb", perturb)
    interrupt = True
    assert run_eval(capsys, *common)[0] == 130
    first = outputs(tmp_path)
    assert run_eval(capsys, *common, "--resume")[0] == 130
    second = outputs(tmp_path)
    assert second[0]["accuracy"]["pgd1"] == first[0]["accuracy"]["pgd1"] and "pgd1" in second[0]["seconds"]
    assert (second[1]["pgd1"] == first[1]["pgd1"]).all()
    interrupt, steps[:] = False, []
    rc, out, _ = run_eval(capsys, *common, "--resume")
    assert rc == 0 and set(steps) == {2} and "| Clean | PGD-1 | PGD-2 |" in out


# ----------------------------------------------------------------------------- checkpoints and usage


@pytest.mark.parametrize("argv", [["--attacks", "pgd"], ["--attacks", "pgd0"], ["--attacks", "clean,fgsm"],
                                  ["--n", "0"], ["--n", "-5"], ["--epsilon", "0"], ["--epsilon", "3/2"],
                                  ["--step-size", "0"], ["--restarts", "0"], ["--model", "guide"]])
def test_bad_arguments_are_one_line_errors(folder, capsys, tmp_path, argv):
    assert_usage_error(*run_eval(capsys, folder["ckpt"], "--out-dir", tmp_path, *argv)[::2])


def test_missing_or_corrupt_checkpoint(capsys, tmp_path):
    assert_usage_error(*run_eval(capsys, tmp_path / "nope.pt")[::2])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert_usage_error(*run_eval(capsys, tmp_path / "bad.pt")[::2])


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_checkpoint_keys_must_match_the_architecture(synthetic_ckpt, capsys, tmp_path, change):
    ckpt = torch.load(synthetic_ckpt, weights_only=True)
    if change == "missing":
        del ckpt["target"]["fc.bias"]
    else:
        ckpt["target"]["fc.extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    rc, _, err = run_eval(capsys, tmp_path / "ckpt.pt", "--attacks", "clean")
    assert_usage_error(rc, err)
    assert "keys do not match" in err


def test_plain_state_dict_needs_arch_and_dataset(synthetic_ckpt, capsys, tmp_path):
    ckpt = torch.load(synthetic_ckpt, weights_only=True)
    torch.save({f"module.{k}": v for k, v in ckpt["guide"].items()}, tmp_path / "plain.pt")
    assert_usage_error(*run_eval(capsys, tmp_path / "plain.pt", "--attacks", "clean")[::2])
    rc, out, _ = run_eval(capsys, tmp_path / "plain.pt", "--arch", "wrn-10-1", "--dataset", "synthetic",
                          "--attacks", "clean", "--out-dir", tmp_path / "plain")
    assert rc == 0 and "stripped prefix 'module.'" in out
    rc, _, _ = run_eval(capsys, synthetic_ckpt, "--model", "guide", "--attacks", "clean",
                        "--out-dir", tmp_path / "ours")
    assert rc == 0  # the same weights through dynat.py's format: the same predictions
    assert (outputs(tmp_path / "plain")[1]["clean"] == outputs(tmp_path / "ours")[1]["clean"]).all()


# ----------------------------------------------------------------------------- end to end


def test_cli_end_to_end(synthetic_ckpt, tmp_path):
    out_dir = tmp_path / "eval"
    cmd = [sys.executable, "evaluate.py", str(synthetic_ckpt), "--attacks", "clean,pgd2,cw2", "--n", "12",
           "--batch-size", "8", "--restarts", "2", "--epsilon", "8/255", "--out-dir", str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny tensors, as one_thread above
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].startswith("clean accuracy:") and "first 12 of 256 test images" in lines[0]
    assert "| Model | Clean | PGD-2 | C&W-2 | All | Worst |" in lines
    row = next(line for line in lines if line.startswith("| last.pt [target: wrn-10-1]"))
    results, arrays = outputs(out_dir)
    values = [float(v) for v in row.strip("|").split("|")[1:]]
    acc = results["accuracy"]
    assert values == pytest.approx([100 * acc["clean"], 100 * acc["pgd2"], 100 * acc["cw2"],
                                    100 * results["all"], 100 * results["worst"]], abs=0.006)
    assert results["n"] == 12 and results["epsilon"] == 8 / 255 and results["step_size"] == 2 / 255
    assert results["seed"] == 0 and results["restarts"] == 2 and results["complete"]
    assert results["versions"] == dict(results["versions"], torch=torch.__version__,
                                       pyautoattack=pyautoattack.__version__)
    assert set(results["seconds"]) == {"clean", "pgd2", "cw2"}
    model, threads = this_machine(1)  # OMP_NUM_THREADS above
    assert results["machine"].startswith(model) and results["machine"].endswith(threads)
    assert set(arrays) == {"clean", "pgd2", "cw2", "worst"} and all(len(a) == 12 for a in arrays.values())
    with open(out_dir / "results.md") as f:
        assert row in f.read()

    # A checkpoint whose keys do not match, in a real process: one line, exit code 2, no traceback.
    ckpt = torch.load(synthetic_ckpt, weights_only=True)
    ckpt["target"]["block1.extra.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "bad.pt")
    proc = subprocess.run([sys.executable, "evaluate.py", str(tmp_path / "bad.pt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- a newcomer's first evaluations

def test_evaluations_with_other_settings_never_share_a_default_out_dir(folder, capsys, tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(folder["ckpt"].read_bytes())
    runs = {"pgd2-n8": ["--attacks", "pgd2", "--n", "8"], "pgd2-n12": ["--attacks", "pgd2", "--n", "12"],
            "cw2-n8": ["--attacks", "cw2", "--n", "8"]}
    dirs = {}
    for name, argv in runs.items():
        rc, out, err = run_eval(capsys, ckpt, "--epsilon", EPS, *argv)
        assert rc == 0, err
        dirs[name] = out.split("-> ")[1].splitlines()[0].strip()
    assert len(set(dirs.values())) == 3 and all(os.path.dirname(d) == str(tmp_path) for d in dirs.values())
    first = outputs(dirs["pgd2-n8"])
    assert first[0]["n"] == 8 and list(first[1]) == ["clean", "pgd2", "worst"]
    assert outputs(dirs["pgd2-n12"])[0]["n"] == 12  # the first evaluation was not overwritten
    assert outputs(dirs["pgd2-n8"])[0]["accuracy"] == first[0]["accuracy"]
    # the same settings again find the earlier, finished evaluation and print it, touching nothing
    rc, out, err = run_eval(capsys, ckpt, "--epsilon", EPS, *runs["pgd2-n8"])
    assert rc == 0 and "| PGD-2 |" in out and "already holds this evaluation, finished" in out, err
    assert outputs(dirs["pgd2-n8"])[0]["seconds"] == first[0]["seconds"]
    # other test images under the same dataset name (an ImageFolder elsewhere): another directory too
    other = tmp_path / "other"
    shutil.copytree(folder["root"], other)
    first_image = sorted((other / "test" / "c0").iterdir())[0]
    Image.fromarray(255 - np.asarray(Image.open(first_image))).save(first_image)
    rc, out, err = run_eval(capsys, ckpt, "--epsilon", EPS, *runs["pgd2-n8"], "--data-dir", other)
    assert rc == 0, err
    assert out.split("-> ")[1].splitlines()[0].strip() not in dirs.values()


def test_a_text_file_is_not_a_checkpoint(capsys, tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "lr": 0.02}\n')
    rc, _, err = run_eval(capsys, path)
    assert_usage_error(rc, err)
    assert "not a checkpoint" in err and "arbitrary code" not in err


def test_fp16_is_refused(folder, capsys, tmp_path):
    rc, _, err = run_eval(capsys, folder["ckpt"], "--amp", "fp16", "--out-dir", tmp_path)
    assert_usage_error(rc, err)
    assert "underflows" in err


def test_results_record_each_columns_precision_and_run_deterministically(folder, capsys, tmp_path):
    torch.backends.cudnn.deterministic = False
    rc, out, _ = run_eval(capsys, folder["ckpt"], "--attacks", "pgd1,cw1", "--amp", "bf16", "--n", "8",
                          "--epsilon", EPS, "--out-dir", tmp_path)
    assert rc == 0
    results = outputs(tmp_path)[0]
    assert results["precision"] == {"clean": "float32", "pgd1": "bf16", "cw1": "bf16"}
    assert results["commit"] and results["versions"]["pyautoattack"] == pyautoattack.__version__
    assert "precision: Clean float32, PGD-1 bf16, C&W-1 bf16" in out
    # --resume promises an uninterrupted run's numbers: deterministic cuDNN kernels, no autotuning, no TF32
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_autoattack_only_header_has_no_pgd_step_and_synthetic_data_no_chance_warning(synthetic_ckpt, capsys, tmp_path):
    meta = {"attacks": ["clean", "apgd-ce"], "step_size": 2 / 255, "restarts": 1}
    assert evaluate.pgd_settings(meta) == ""
    assert "step 2/255" in evaluate.pgd_settings(dict(meta, attacks=["clean", "pgd20"]))
    rc, out, _ = run_eval(capsys, synthetic_ckpt, "--attacks", "clean", "--n", "16", "--out-dir", tmp_path)
    assert rc == 0 and "near chance" not in out and "step" not in out.splitlines()[0]


# ----------------------------------------------------------------------------- L2, the EMA, RobustBench's form

def save_variant(folder, path, **changes):
    """The fixture's checkpoint with some entries changed (e.g. the args of an L2 run, an EMA model)."""
    ckpt = torch.load(folder["ckpt"], weights_only=True)
    ckpt.update(changes)
    torch.save(ckpt, path)
    return path


def test_l2_checkpoints_are_attacked_in_the_l2_ball_and_results_name_the_norm(folder, capsys, tmp_path, monkeypatch):
    """A checkpoint trained with --norm l2 is evaluated under L2 by default: radius 128/255 and step 15/255, PGD
    through dynat.perturb with norm="l2", AutoAttack with norm="L2" (its flags those of the library's own call)."""
    ckpt = save_variant(folder, tmp_path / "l2.pt", args=checkpoint_args(dataset="imagefolder", data_dir=folder["root"],
                                                                          target="wrn-10-1", labels="true", norm="l2"))
    norms, real = [], dynat.perturb
    monkeypatch.setattr(dynat, "perturb", lambda *a, **kw: norms.append((kw["norm"], kw["epsilon"])) or real(*a, **kw))
    rc, out, err = run_eval(capsys, ckpt, "--attacks", "pgd2", "--n", "8", "--out-dir", tmp_path / "pgd")
    assert rc == 0, err
    results = outputs(tmp_path / "pgd")[0]
    assert (results["norm"], results["epsilon"], results["step_size"]) == ("l2", 128 / 255, 15 / 255)
    assert set(norms) == {("l2", 128 / 255)}
    with open(tmp_path / "pgd" / "results.md") as f:
        assert "L2 eps = 128/255" in f.read()
    x, y = folder["x"][:8], folder["y"][:8]
    adversary = pyautoattack.AutoAttack(folder["model"], norm="L2", eps=0.08, version="standard", seed=0, device="cpu")
    adversary.attacks_to_run = ["apgd-ce"]
    reference = (adversary.run_standard_evaluation(x, y, batch_size=8)[1] == y).tolist()
    assert 0 < sum(reference) < 8  # L-inf 0.08 would break every point
    rc, _, err = run_eval(capsys, ckpt, "--attacks", "apgd-ce", "--n", "8", "--epsilon", "0.08", "--out-dir",
                          tmp_path / "aa")
    assert rc == 0, err
    assert outputs(tmp_path / "aa")[1]["apgd-ce"].tolist() == reference


def test_the_norm_alone_changes_the_default_out_dir(folder, capsys, tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(folder["ckpt"].read_bytes())
    dirs = set()
    for norm in ("linf", "l2"):
        rc, out, err = run_eval(capsys, ckpt, "--norm", norm, "--epsilon", EPS, "--step-size", "1/255",
                                "--attacks", "pgd1", "--n", "4")
        assert rc == 0, err
        out_dir = out.split("-> ")[1].splitlines()[0].strip()
        assert outputs(out_dir)[0]["norm"] == norm
        dirs.add(out_dir)
    assert len(dirs) == 2


def test_target_ema_evaluates_the_average_and_a_run_without_one_says_so(folder, capsys, tmp_path):
    ema = {k: v.clone() for k, v in folder["model"].state_dict().items()}
    ema["fc.bias"][0] += 100  # the average predicts class 0 everywhere: 16 of the 64 test images
    ckpt = save_variant(folder, tmp_path / "ema.pt", ema=ema)
    results = {}
    for model in ("target", "target-ema"):
        rc, _, err = run_eval(capsys, ckpt, "--model", model, "--attacks", "clean", "--out-dir", tmp_path / model)
        assert rc == 0, err
        results[model] = outputs(tmp_path / model)[0]
    assert results["target-ema"]["accuracy"]["clean"] == 0.25 and results["target"]["accuracy"]["clean"] > 0.8
    assert results["target-ema"]["model"] == "target-ema"
    rc, _, err = run_eval(capsys, folder["ckpt"], "--model", "target-ema", "--out-dir", tmp_path / "none")
    assert_usage_error(rc, err)
    assert "holds no target-ema model (trained without --ema)" in err


ROBUSTBENCH_FIELDS = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                      "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable"}


def test_autoattack_on_a_whole_cifar_test_set_writes_robustbench_model_info(folder, capsys, tmp_path, monkeypatch):
    """Clean and AA on every test image of CIFAR-10 (here: the fixture's 16 first images under that name) give
    robustbench_model_info.json with RobustBench's fields; a subset of the test set gives none."""
    data = dynat.data
    real = data.load_data

    def fake_cifar10(dataset, data_dir, *a, **kw):
        out = real("imagefolder", str(folder["root"]), 0)
        x, y = (t[::4] for t in out["test"])  # 16 images, 4 per class, at CIFAR's shape 3 x 32 x 32
        out["test"] = (x.repeat_interleave(4, 2).repeat_interleave(4, 3), y)
        assert out["test"][0].shape[1:] == (3, 32, 32)
        return out
    monkeypatch.setattr(data, "load_data", fake_cifar10)
    common = [folder["ckpt"], "--dataset", "cifar10", "--attacks", "aa"]
    rc, out, err = run_eval(capsys, *common, "--out-dir", tmp_path / "full")
    assert rc == 0, err
    results = outputs(tmp_path / "full")[0]
    with open(tmp_path / "full" / "robustbench_model_info.json") as f:
        info = json.load(f)
    assert set(info) == ROBUSTBENCH_FIELDS and "fill in" in out
    # the keys of a leaderboard entry as RobustBench ships it (model_info/cifar10/Linf/Rice2020Overfitting.json)
    assert {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
            "architecture", "eps", "clean_acc", "reported", "autoattack_acc"} <= set(info)
    assert (info["dataset"], info["eps"], info["architecture"]) == ("cifar10", "8/255", "WideResNet-10-1")
    assert info["clean_acc"] == f"{100 * results['accuracy']['clean']:.2f}"
    assert info["autoattack_acc"] == f"{100 * results['accuracy']['aa']:.2f}"
    assert info["additional_data"] is False and info["number_forward_passes"] == 1 and info["venue"] == ""
    rc, _, err = run_eval(capsys, *common, "--n", "15", "--out-dir", tmp_path / "part")
    assert rc == 0, err
    assert not os.path.exists(tmp_path / "part" / "robustbench_model_info.json")
    assert evaluate.robustbench_info(tmp_path, dict(results, norm="l2", epsilon=0.5, arch="resnet18"),
                                     {"clean": torch.ones(4, dtype=torch.bool), "aa": torch.zeros(4, dtype=torch.bool)})
    with open(tmp_path / "robustbench_model_info.json") as f:
        info = json.load(f)
    assert (info["eps"], info["architecture"], info["clean_acc"], info["autoattack_acc"]) == ("0.5", "ResNet-18",
                                                                                              "100.00", "0.00")


def test_resume_starts_a_new_evaluation_and_repeats_a_finished_one_with_exit_0(folder, capsys, tmp_path, monkeypatch):
    """--resume means "continue it if it is there": tools/tables.py passes it on every run of a row."""
    common = [folder["ckpt"], "--epsilon", EPS, "--n", "16", "--attacks", "pgd2", "--out-dir", tmp_path, "--resume"]
    rc, out, err = run_eval(capsys, *common)
    assert rc == 0, err
    first = outputs(tmp_path)[0]
    calls = []
    monkeypatch.setattr(dynat, "perturb", lambda *a, **kw: calls.append(kw) or (_ for _ in ()).throw(AssertionError))
    rc, out, err = run_eval(capsys, *common)
    assert rc == 0 and calls == [] and "already holds this evaluation, finished" in out and "| PGD-2 |" in out
    assert outputs(tmp_path)[0]["accuracy"] == first["accuracy"]


def test_dry_run_runs_every_attack_at_its_smallest_and_never_passes_for_a_real_evaluation(folder, capsys, tmp_path,
                                                                                          monkeypatch):
    import pyautoattack
    steps, settings = [], []
    real_perturb, real_run = dynat.perturb, pyautoattack.AutoAttack.run_standard_evaluation
    monkeypatch.setattr(dynat, "perturb", lambda *a, **kw: steps.append(kw["num_steps"]) or real_perturb(*a, **kw))

    def run(self, *a, **kw):
        settings.append((self.apgd.n_iter, self.apgd_targeted.n_target_classes, self.square.n_queries))
        return real_run(self, *a, **kw)
    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", run)
    rc, out, err = run_eval(capsys, folder["ckpt"], "--epsilon", EPS, "--n", "16", "--attacks", "pgd20,aa",
                            "--dry-run", "--out-dir", tmp_path)
    assert rc == 0, err
    assert set(steps) == {1} and settings and set(settings) == {(1, 1, 10)}
    assert outputs(tmp_path)[0]["dry_run"] is True
    rc, _, err = run_eval(capsys, folder["ckpt"], "--epsilon", EPS, "--n", "16", "--attacks", "pgd20,aa",
                          "--out-dir", tmp_path, "--resume")
    assert_usage_error(rc, err)
    assert "dry_run" in err


def test_a_run_directory_is_pointed_at_its_checkpoints_that_exist(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rc, _, err = run_eval(capsys, run)
    assert rc == 2 and "holds no last.pt or best.pt" in err and "pass" not in err
    (run / "best.pt").write_bytes(b"")
    rc, _, err = run_eval(capsys, run)
    assert rc == 2 and f"pass {run / 'best.pt'}" in err and "last.pt" not in err.split("pass")[1]
