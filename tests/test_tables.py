"""tools/tables.py: the paper's tables read from docs/reproducing.md, run row by row (skipping what finished,
continuing what stopped), printed for a scheduler, smoke-tested, and reported beside the paper's figures."""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = os.path.join(ROOT, "tools", "tables.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import tables  # noqa: E402

FAST = "--dataset synthetic --target wrn-10-1 --guide wrn-10-1 --epochs 1 --dry-run --batch-size 8 --num-steps 1 " \
       "--eval-pgd-n 8 --workers 0"
EVAL = "--attacks clean,pgd1 --n 8 --workers 0"
TINY_DOC = f"""# A tiny table of synthetic rows

| row | train | other readings | evaluate | setting | paper | ours |
|---|---|---|---|---|---|---|
| T9 Fast-A | `python dynat.py {FAST} --inner --out-dir runs/t9-a` | — | `python evaluate.py runs/t9-a/last.pt {EVAL}` | tiny | 10.00 / 5.00 | not yet run |
| T9 Fast-B | `python dynat.py {FAST} --labels true --inner --out-dir runs/t9-b` | — | `python evaluate.py runs/t9-b/last.pt {EVAL}` | tiny | 20.00 / 10.00 | not yet run |
| T9 Broken | `python dynat.py {FAST} --target vgg16 --out-dir runs/t9-broken` | — | `python evaluate.py runs/t9-broken/last.pt {EVAL}` | tiny | 30.00 / 15.00 | not yet run |
| T9 Never run | `python dynat.py {FAST} --out-dir runs/t9-never` | — | `python evaluate.py runs/t9-never/last.pt {EVAL}` | tiny | 40.00 / 20.00 | not yet run |
"""


def run_tables(*args, doc=None):
    argv = [sys.executable, TABLES, *args] + (["--doc", str(doc)] if doc else [])
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def shell(line):
    """A printed line, run by bash from the repository as a scheduler would: `python` is this interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_every_row_of_the_papers_tables_is_read_with_its_commands_and_figures():
    rows = tables.read_rows()
    assert [r.table for r in rows].count("T1") == 11 and len(rows) == 33
    assert {r.table for r in rows} == {"T1", "T2", "T3", "T4"}
    for r in rows:
        assert r.train[:2] == ["python", "dynat.py"] and r.evaluate[:2] == ["python", "evaluate.py"], r.name
        assert r.out_dir.startswith("runs/") and r.evaluate[2] == r.out_dir + "/last.pt", r.name
        assert len(r.paper) == len(r.attacks) and r.attacks[0] == "clean" and r.attacks[-1] == "aa", r.name
    headline = next(r for r in rows if r.table == "T2" and r.name.startswith("DYNAT-Inner-AWP"))
    assert headline.paper == {"clean": 58.87, "pgd10": 35.61, "pgd20": 35.09, "pgd50": 35.05, "cw20": 32.10, "aa": 29.70}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tables")
    (tmp / "reproducing.md").write_text(TINY_DOC)
    return tmp


def test_print_run_skip_continue_fail_and_report(tiny):
    doc, runs, out = tiny / "reproducing.md", tiny / "runs", tiny / "report"
    common = ("--table", "T9", "--runs-dir", str(runs), "--report-dir", str(out))
    r = run_tables(*common, "--print", doc=doc)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4 and all(" && python evaluate.py " in line for line in lines)
    # Fast-A: its printed line, run by a shell as is, trains and evaluates
    r = shell(lines[0])
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(runs / "t9-a" / "eval" / "results.json")
    # Fast-B: trained but never evaluated (as a job killed between its two commands)
    r = shell(lines[1].split(" && ")[0])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_tables(*common, "--report", doc=doc)
    assert r.returncode == 0, r.stderr
    states = {e["row"]: e["states"]["0"] for e in json.loads((out / "T9.json").read_text())}
    assert states == {"Fast-A": "finished", "Fast-B": "interrupted: run again to continue it",
                      "Broken": "missing: not run", "Never run": "missing: not run"}
    # an evaluation killed after its last attack but before it marked itself complete is not finished
    results = runs / "t9-a" / "eval" / "results.json"
    whole = results.read_text()
    results.write_text(json.dumps(dict(json.loads(whole), complete=False)))
    run_tables(*common, "--report", doc=doc)
    assert json.loads((out / "T9.json").read_text())[0]["states"]["0"] == "interrupted: run again to continue it"
    results.write_text(whole)
    # Broken fails with its one-line reason; Fast-A is skipped, Fast-B continued and evaluated
    r = run_tables(*common, "--rows", "Broken", doc=doc)
    assert r.returncode == 0 and "T9 Broken seed 0: failed (dynat.py exited 2: dynat.py: error: --target" in r.stdout
    r = run_tables(*common, "--rows", "Fast", doc=doc)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "T9 Fast-A seed 0: finished, skipped" in r.stdout and "t9-b" in r.stdout
    r = run_tables(*common, "--report", doc=doc)
    entries = {e["row"]: e for e in json.loads((out / "T9.json").read_text())}
    assert entries["Fast-B"]["states"]["0"] == "finished" and entries["Broken"]["states"]["0"].startswith(
        "failed: dynat.py exited 2: dynat.py: error: --target")
    assert entries["Never run"]["states"]["0"] == "missing: not run"
    result = json.loads((runs / "t9-a" / "eval" / "results.json").read_text())
    clean = entries["Fast-A"]["columns"]["clean"]
    assert clean["ours"] == pytest.approx(100 * result["accuracy"]["clean"]) and clean["paper"] == 10.0
    assert clean["diff"] == pytest.approx(clean["ours"] - 10.0) and clean["std"] is None
    with open(out / "T9.csv") as f:
        table = list(csv.DictReader(f))
    assert [(row["row"], row["attack"]) for row in table][:2] == [("Fast-A", "clean"), ("Fast-A", "pgd1")]
    assert "| T9 Fast-A | 1 of 1 | clean | 10.00 |" in (out / "T9.md").read_text()
    assert (out / "T9.png").stat().st_size > 1000


def test_a_second_seed_gives_mean_and_spread(tiny):
    doc, runs, out = tiny / "reproducing.md", tiny / "runs2", tiny / "report2"
    r = run_tables("--table", "T9", "--rows", "Fast-A", "--seeds", "0,1", "--runs-dir", str(runs), "--report-dir",
                   str(out), doc=doc)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(runs / "t9-a-s1" / "eval" / "results.json")
    assert json.loads((runs / "t9-a-s1" / "args.json").read_text())["seed"] == 1
    entry = json.loads((out / "T9.json").read_text())[0]
    accs = [100 * json.loads((runs / d / "eval" / "results.json").read_text())["accuracy"]["clean"]
            for d in ("t9-a", "t9-a-s1")]
    assert entry["n"] == 2 and entry["columns"]["clean"]["ours"] == pytest.approx(sum(accs) / 2)


def test_smoke_says_which_rows_start_and_why_one_fails(tiny):
    """A real row of the paper (its real ResNet-18 target, synthetic CIFAR-shaped images), and a broken one."""
    r = run_tables("--table", "T3", "--rows", "GAIRAT, ResNet-18", "--smoke", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "T3 GAIRAT, ResNet-18: starts" in r.stdout and "1 of 1 rows start" in r.stdout
    r = run_tables("--table", "T9", "--rows", "Broken", "--smoke", "--device", "cpu", doc=tiny / "reproducing.md")
    assert r.returncode == 1
    assert "FAILS: T9 Broken: dynat.py exited 2: dynat.py: error: --target" in r.stdout and "0 of 1 rows start" in r.stdout
