"""The block a researcher pastes, and dynat.py copied alone, work in someone else's project.

The block (BEGIN DYNAT BLOCK ... END DYNAT BLOCK of dynat.py) is extracted as text and run in a fresh
interpreter beside a `models/` package of another project's (every research repository has one). Its loss,
statistics, both models' gradients and BatchNorm buffers must equal the full script's bitwise, variant by
variant, on that project's own networks.
"""
import json
import os
import subprocess
import sys
import textwrap

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

THEIR_MODELS = '''
"""Another project's models package: names that clash with ours, and its own network."""
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
'''

# (name, Config keywords, autocast dtype or None): every variant of the block
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
]

DRIVER = '''
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from {module} import Config, dynat_loss
from models import Net

out = {{}}
for name, kw, dtype in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    target, guide = Net(), Net()
    x, y = torch.rand(8, 3, 12, 12), torch.randint(0, 10, (8,))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=getattr(torch, dtype or "float32"), enabled=dtype is not None):
        loss, stats = dynat_loss(target, guide if kw.get("labels") != "true" else None, x, y, Config(**kw))
    loss.backward()
    out[name] = dict(loss=loss.detach(), stats=stats,
                     grads={{f"{{m}}.{{n}}": p.grad for m, model in (("target", target), ("guide", guide))
                            for n, p in model.named_parameters() if p.grad is not None}},
                     buffers={{f"{{m}}.{{n}}": b for m, model in (("target", target), ("guide", guide))
                              for n, b in model.named_buffers()}})
torch.save(out, sys.argv[3])
'''


def block_text():
    with open(os.path.join(ROOT, "dynat.py")) as f:
        lines = f.read().splitlines(keepends=True)
    marker = lambda i, word: lines[i].startswith("# ====") and lines[i].rstrip().endswith(f"{word} DYNAT BLOCK")
    begin, end = (next(i for i in range(len(lines)) if marker(i, word)) for word in ("BEGIN", "END"))
    assert sum(marker(i, "BEGIN") or marker(i, "END") for i in range(len(lines))) == 2  # marked at both ends, once
    return "".join(lines[begin:end + 1])


def their_project(tmp_path):
    (tmp_path / "models").mkdir(parents=True)
    (tmp_path / "models" / "__init__.py").write_text(THEIR_MODELS)
    return tmp_path


def run_driver(project, module, out):
    driver = project / "driver.py"
    driver.write_text(DRIVER.format(module=module))
    r = subprocess.run([sys.executable, str(driver), str(project), json.dumps(VARIANTS), str(out)], cwd=project,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_the_pasted_block_alone_computes_what_dynat_py_computes_bitwise(tmp_path):
    block = block_text()
    imports = [line for line in block.splitlines() if line.startswith(("import ", "from "))]
    assert imports and all(line.split()[1].split(".")[0] in ("torch", "contextlib", "dataclasses") for line in imports)
    pasted = their_project(tmp_path / "theirs")
    (pasted / "pasted.py").write_text(block)  # the block's text, nothing else
    full = their_project(tmp_path / "full")
    (full / "dynat.py").write_text(open(os.path.join(ROOT, "dynat.py")).read())
    a = run_driver(pasted, "pasted", tmp_path / "pasted.pt")
    b = run_driver(full, "dynat", tmp_path / "full.pt")
    assert sorted(a) == sorted(name for name, _, _ in VARIANTS) == sorted(b)
    for name in a:
        assert torch.equal(a[name]["loss"], b[name]["loss"]), name
        for part in ("stats", "grads", "buffers"):
            assert a[name][part].keys() == b[name][part].keys() and a[name][part], (name, part)
            different = [k for k in a[name][part] if not torch.equal(a[name][part][k], b[name][part][k])]
            assert not different, (name, part, different)
    assert a["awp-alpha-beta"]["grads"].keys() >= {"target.conv.weight", "guide.fc.weight"}


def test_dynat_py_copied_alone_into_another_project_trains_its_networks(tmp_path):
    """`from dynat import dynat_loss` in a project with its own `models` package: importing dynat imports no
    `models` (neither theirs nor ours), and a training step of that project's networks moves their weights."""
    project = their_project(tmp_path)
    (project / "dynat.py").write_text(open(os.path.join(ROOT, "dynat.py")).read())
    script = textwrap.dedent('''
        import sys, torch
        from dynat import Config, dynat_loss
        assert "models" not in sys.modules and not any(name.startswith("dynat_") for name in sys.modules)
        from models import Net
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
    ''')
    r = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained ['dyn_correct', 'loss_guide', 'loss_target']" in r.stdout


def test_the_scripts_copied_into_another_project_train_our_networks_there(tmp_path):
    """dynat.py, models.py and data.py copied beside that project's `models/` package (which `import models`
    would find first) and run from there: our networks are built, theirs never are."""
    from test_scripts import TINY, make_imagefolder
    project = their_project(tmp_path / "theirs")
    for name in ("dynat.py", "models.py", "data.py"):
        (project / name).write_text(open(os.path.join(ROOT, name)).read())
    folder = make_imagefolder(tmp_path / "images", train_per_class=8, test_per_class=4)
    r = subprocess.run([sys.executable, "dynat.py", "--dataset", "imagefolder", "--data-dir", folder, "--epochs", "1",
                        "--out-dir", "run", *TINY], cwd=project, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training wrn-10-1 (target) with wrn-10-1 guide" in r.stdout and (project / "run" / "last.pt").exists()
