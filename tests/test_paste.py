"""The block a researcher pastes, and dynat.py copied alone, work in someone else's project.

The block is extracted as the README tells a researcher to, with the plain sed range over its two markers, and run
in a fresh interpreter beside a `models/` package of another project's (every research repository has one). Its
loss, statistics, both models' gradients and BatchNorm buffers must equal the full script's bitwise, method by
method, on that project's own networks. There too: AWP on a network with weights its forward never uses (the
WideResNet that TRADES, MART, GAIRAT and the DYNAT release ship), mistyped settings refused by name, eval-mode
models refused.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

THEIR_MODELS = '''
"""Another project's models package: names that clash with ours, and its own networks."""
import torch.nn as nn
import torch.nn.functional as F


def build_model(*a, **kw):
    raise RuntimeError("their build_model: dynat must never call it")


class Net(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


class NetWithUnused(Net):
    """Net with a block its forward never calls, as the sub_block1 of TRADES's WideResNet (built last)."""

    def __init__(self, classes=10):
        super().__init__(classes)
        self.sub_block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
'''

# (name, Config keywords, autocast dtype or None): every method of the block, and DYNAT's variants
VARIANTS = [
    ("kl-attack", {}, None),
    ("inner", {"inner": True}, None),
    ("awp-alpha-beta", {"awp": True, "alpha": 1.0, "beta": 0.2}, None),
    ("true-gairat", {"labels": "true", "inner": True, "reweight": "gairat"}, None),
    ("mail-smoothing", {"reweight": "mail", "label_smoothing": 0.1}, None),
    ("lbgat", {"labels": "lbgat", "inner": True}, None),
    ("iseat-awp", {"inner": True, "awp": True, "iseat": 0.1}, None),
    ("no-clean-bn", {"inner": True, "clean_bn": False}, None),
    ("bf16-awp", {"awp": True, "inner": True}, "bfloat16"),
    ("pgd-at-awp", {"labels": "true", "inner": True, "start": "uniform", "awp": True}, None),
    ("trades-awp", {"labels": "true", "loss": "trades", "alpha": 6.0, "awp": True}, None),
    ("mart", {"labels": "true", "loss": "mart", "alpha": 6.0, "inner": True}, None),
    ("fat", {"labels": "true", "inner": True, "fat_tau": 1}, None),
    ("sat", {"labels": "true", "loss": "trades", "alpha": 6.0, "sat": True}, None),
]

# what a researcher mistypes (TRADES's own spellings among them), and the field its refusal must name
MISTYPED = [({"loss": "CE"}, "loss"), ({"labels": "dyn"}, "labels"), ({"reweight": "GAIRAT"}, "reweight"),
            ({"start": "Uniform"}, "start"), ({"norm": "l_inf"}, "norm"), ({"epsilon": "8/255"}, "epsilon"),
            ({"epsilon": 8.0}, "epsilon"), ({"epsilon": 0.0}, "epsilon"), ({"step_size": -0.01}, "step_size"),
            ({"step_size": 0}, "step_size"), ({"num_steps": -1}, "num_steps"), ({"num_steps": 2.5}, "num_steps"),
            ({"beta": "1"}, "beta"), ({"alpha": float("nan")}, "alpha"), ({"inner": "False"}, "inner"),
            ({"label_smoothing": 1.0}, "label_smoothing"), ({"inner_label": "true"}, "inner_label"),
            ({"loss": "trades"}, "loss")]

DRIVER = '''
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from {module} import Config, training_loss, dynat_loss
from models import Net, NetWithUnused


def pair(net):
    """A target and a guide, each with its own seed: a block built after the used layers changes neither."""
    torch.manual_seed(0)
    target = net()
    torch.manual_seed(10)
    return target, net()


def step(kw, dtype, target, guide):
    torch.manual_seed(2)
    x, y = torch.rand(8, 3, 12, 12), torch.randint(0, 10, (8,))
    torch.manual_seed(1)
    soft = torch.full((8, 10), 0.1) if kw.pop("sat", False) else None
    if kw.get("labels") == "true":
        guide = None
    with torch.autocast("cpu", dtype=getattr(torch, dtype or "float32"), enabled=dtype is not None):
        loss, stats = training_loss(target, guide, x, y, Config(**kw), soft_labels=soft)
    loss.backward()
    models = [(m, model) for m, model in (("target", target), ("guide", guide)) if model is not None]
    return dict(loss=loss.detach(), stats=stats,
                grads={{f"{{m}}.{{n}}": p.grad for m, model in models for n, p in model.named_parameters()
                       if p.grad is not None}},
                buffers={{f"{{m}}.{{n}}": b for m, model in models for n, b in model.named_buffers()
                         if "sub_block1" not in n}})


out = {{}}
for name, kw, dtype in json.loads(sys.argv[2]):
    out[name] = step(kw, dtype, *pair(Net))
for name, kw in (("unused-awp", dict(awp=True, inner=True)), ("unused-pgd-at-awp", dict(labels="true", awp=True))):
    out[name] = dict(with_unused=step(dict(kw), None, *pair(NetWithUnused)), without=step(dict(kw), None, *pair(Net)))
refused = []
for kw, field in json.loads(sys.argv[3]):
    try:
        Config(**kw)
        refused.append([field, "accepted"])
    except (ValueError, TypeError) as e:
        refused.append([field, type(e).__name__ + ": " + str(e)])
out["refused"] = refused
eval_mode = []
for who in ("target", "guide"):
    target, guide = Net(), Net()
    dict(target=target, guide=guide)[who].eval()
    try:
        dynat_loss(target, guide, torch.rand(4, 3, 12, 12), torch.randint(0, 10, (4,)), Config())
        eval_mode.append([who, "accepted"])
    except ValueError as e:
        eval_mode.append([who, str(e)])
out["eval_mode"] = eval_mode
torch.save(out, sys.argv[4])
'''


def block_text():
    """The block as the README tells a researcher to extract it: the plain sed range over its markers."""
    with open(os.path.join(ROOT, "dynat.py")) as f:
        text = f.read()
    assert text.count("BEGIN DYNAT BLOCK") == 1 and text.count("END DYNAT BLOCK") == 1  # each marker once
    r = subprocess.run(["sed", "-n", "/BEGIN DYNAT BLOCK/,/END DYNAT BLOCK/p", "dynat.py"], cwd=ROOT,
                       capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("# ====") and lines[-1].startswith("# ====") and lines[-1].endswith("END DYNAT BLOCK")
    assert "def dynat_loss(" in r.stdout and "def training_loss(" in r.stdout
    return r.stdout


def their_project(tmp_path):
    (tmp_path / "models").mkdir(parents=True)
    (tmp_path / "models" / "__init__.py").write_text(THEIR_MODELS)
    return tmp_path


def run_driver(project, module, out):
    driver = project / "driver.py"
    driver.write_text(DRIVER.format(module=module))
    r = subprocess.run([sys.executable, str(driver), str(project), json.dumps(VARIANTS), json.dumps(MISTYPED),
                        str(out)], cwd=project, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_same(a, b, name):
    assert torch.equal(a["loss"], b["loss"]), name
    for part in ("stats", "grads", "buffers"):
        assert a[part].keys() == b[part].keys() and a[part], (name, part)
        different = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not different, (name, part, different)


@pytest.fixture(scope="module")
def pasted_and_full(tmp_path_factory):
    """The driver's results with the pasted block alone, and with the whole dynat.py, beside their models."""
    tmp_path = tmp_path_factory.mktemp("paste")
    block = block_text()
    imports = [line for line in block.splitlines() if line.startswith(("import ", "from "))]
    stdlib = ("contextlib", "dataclasses", "math", "numbers")
    assert imports and all(line.split()[1].split(".")[0] in ("torch", *stdlib) for line in imports)
    pasted = their_project(tmp_path / "theirs")
    (pasted / "pasted.py").write_text(block)  # the block's text, nothing else
    full = their_project(tmp_path / "full")  # dynat.py and the files it imports; their `from models import` after it
    for name in ("dynat.py", "dynat_runs.py", "models.py", "data.py"):
        (full / name).write_text(open(os.path.join(ROOT, name)).read())
    return run_driver(pasted, "pasted", tmp_path / "pasted.pt"), run_driver(full, "dynat", tmp_path / "full.pt")


def test_the_pasted_block_alone_computes_what_dynat_py_computes_bitwise(pasted_and_full):
    pasted, full = pasted_and_full
    for name, _, _ in VARIANTS:
        assert_same(pasted[name], full[name], name)
    assert pasted["awp-alpha-beta"]["grads"].keys() >= {"target.conv.weight", "guide.fc.weight"}
    assert "soft_labels" in pasted["sat"]["stats"] and not any(k.startswith("guide") for k in pasted["mart"]["grads"])


def test_pasted_awp_leaves_weights_the_forward_never_uses_alone(pasted_and_full):
    """AWP neither fails on a sub_block1 the forward never calls nor lets it change anything: the network with it
    computes, bitwise, what the network without it computes (loss, statistics, gradients, BatchNorm buffers)."""
    for name in ("unused-awp", "unused-pgd-at-awp"):
        run = pasted_and_full[0][name]
        assert_same(run["with_unused"], run["without"], name)
        assert not any("sub_block1" in k for k in run["with_unused"]["grads"])


def test_pasted_config_refuses_every_mistyped_setting_by_name(pasted_and_full):
    for field, outcome in pasted_and_full[0]["refused"]:
        assert outcome.startswith(("ValueError: Config.", "TypeError: Config.")), (field, outcome)
        assert f"Config.{field}=" in outcome, (field, outcome)
    outcomes = dict(pasted_and_full[0]["refused"])
    assert "'ce', 'trades', 'mart'" in outcomes["loss"] or "labels='true'" in outcomes["loss"]
    assert "'linf', 'l2'" in outcomes["norm"] and outcomes["epsilon"].startswith("ValueError")


def test_pasted_dynat_loss_refuses_a_model_in_eval_mode(pasted_and_full):
    assert [who for who, _ in pasted_and_full[0]["eval_mode"]] == ["target", "guide"]
    for who, outcome in pasted_and_full[0]["eval_mode"]:
        assert outcome.startswith(f"{who} is in eval mode"), (who, outcome)


IMPORTED = {  # our files copied into their project -> what importing dynat must leave in sys.modules
    ("dynat.py",): 'assert "models" not in sys.modules and not any(n.startswith("dynat_") for n in sys.modules)',
    ("dynat.py", "dynat_runs.py", "models.py", "data.py"): 'assert "models" not in sys.modules and "data" not in '
                                                            'sys.modules'}


@pytest.mark.parametrize("files", list(IMPORTED), ids=["dynat.py alone", "with the files it imports"])
def test_dynat_py_copied_into_another_project_trains_its_networks(tmp_path, files):
    """`from dynat import dynat_loss` in a project with its own `models` package. Copied alone, importing dynat
    imports no `models` (neither theirs nor ours) and training says which files it needs; with the files it
    imports, ours is held under another name and leaves no `models` behind. Either way their `from models import`
    then finds theirs, and a training step of their networks moves their weights."""
    project = their_project(tmp_path)
    for name in files:
        (project / name).write_text(open(os.path.join(ROOT, name)).read())
    script = textwrap.dedent('''
        import os, sys, torch
        from dynat import Config, dynat_loss
        {imported}
        from models import Net
        assert sys.modules["models"].__file__ == os.path.abspath(os.path.join("models", "__init__.py"))
        torch.manual_seed(0)
        target, guide = Net(), Net()
        optimizer = torch.optim.SGD([*target.parameters(), *guide.parameters()], lr=0.1)
        before = [p.detach().clone() for p in target.parameters()]
        x, y = torch.rand(16, 3, 12, 12), torch.randint(0, 10, (16,))
        loss, stats = dynat_loss(target, guide, x, y, Config(inner=True, awp=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and all(not torch.equal(a, b) for a, b in zip(before, target.parameters()))
        print("trained", sorted(stats))
    ''').format(imported=IMPORTED[files])
    r = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained ['dyn_correct', 'loss_guide', 'loss_target']" in r.stdout
    if files == ("dynat.py",):  # training needs the other three files, and says so
        r = subprocess.run([sys.executable, "dynat.py", "--epochs", "1"], cwd=project, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip() == ("dynat.py: error: training needs dynat_runs.py, models.py "
                                                          "and data.py beside dynat.py")


def test_the_scripts_copied_into_another_project_train_our_networks_there(tmp_path):
    """dynat.py, models.py and data.py copied beside that project's `models/` package (which `import models`
    would find first) and run from there: our networks are built, theirs never are."""
    from test_scripts import TINY, make_imagefolder
    project = their_project(tmp_path / "theirs")
    for name in ("dynat.py", "dynat_runs.py", "models.py", "data.py"):
        (project / name).write_text(open(os.path.join(ROOT, name)).read())
    folder = make_imagefolder(tmp_path / "images", train_per_class=8, test_per_class=4)
    r = subprocess.run([sys.executable, "dynat.py", "--dataset", "imagefolder", "--data-dir", folder, "--epochs", "1",
                        "--out-dir", "run", *TINY], cwd=project, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training wrn-10-1 (target) with wrn-10-1 guide" in r.stdout and (project / "run" / "last.pt").exists()
