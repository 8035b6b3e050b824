"""Every command of docs/reproducing.md runs for one tiny step, so none can rot.

The commands are read from the page itself; each keeps all of its own flags, and a few
appended flags shrink it (synthetic data, tiny models, one batch, the variant switched on from
epoch 1). argparse lets the last occurrence of a flag win, so the row's variant flags stay.
"""
import os
import re
import shlex

import pytest

import dynat
import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRINK = ["--dataset", "synthetic", "--target", "wrn-10-1", "--guide", "wrn-10-1", "--epochs", "1",
          "--dry-run", "--batch-size", "8", "--num-steps", "1", "--eval-pgd-n", "4",
          "--reweight-start", "1", "--awp-warmup", "1"]


def table_rows():
    """(row, train command, evaluate command) for every table row with commands, plus a
    (row + " [release]", release-equivalent command, evaluate command) where a row has one."""
    with open(os.path.join(ROOT, "docs", "reproducing.md")) as f:
        section = f.read()
    rows = []
    for line in section.splitlines():
        if not line.startswith("| "):
            continue
        trains = re.findall(r"`(python dynat\.py [^`]*)`", line)
        evaluations = re.findall(r"`(python evaluate\.py [^`]*)`", line)
        if trains or evaluations:
            name = line.split("|")[1].strip()
            assert len(evaluations) == 1 and len(trains) in (1, 2), line
            rows.append((name, trains[0], evaluations[0]))
            if len(trains) == 2:
                rows.append((name + " [release]", trains[1], evaluations[0]))
    return rows


ROWS = table_rows()


def test_the_table_has_every_paper_row():
    names = " ".join(name for name, _, _ in ROWS)
    assert sum(name.endswith("[release]") for name, _, _ in ROWS) == 7  # every DYNAT row of Tables 1 and 2
    for method in ("T1 DYNAT ", "DYNAT-AWP (α=0)", "DYNAT-AWP (α=1)", "T1 DYNAT-Inner-AWP", "T2 DYNAT-AWP",
                   "T2 DYNAT-Inner-AWP", "DYNAT-Inner-GAIRAT, WRN-34-10 target", "DYNAT-Inner-GAIRAT, ResNet-18 target",
                   "DYNAT-AT-MAIL", "DYNAT-MAIL-Inner", "PGD-AT", "AT-AWP", "GAIRAT", "MAIL-AT", "LBGAT"):
        assert method in names, method


@pytest.mark.parametrize("name,train,evaluation", ROWS, ids=[r[0] for r in ROWS])
def test_table_command_runs_one_step(name, train, evaluation, tmp_path, capsys):
    train_argv = shlex.split(train)[2:]
    out_dir = train_argv[train_argv.index("--out-dir") + 1]
    if not name.endswith("[release]"):
        assert evaluation.split()[2] == f"{out_dir}/last.pt", "evaluate.py must read the row's own run"
    run_dir = str(tmp_path / out_dir)
    assert dynat.main(train_argv + SHRINK + ["--out-dir", run_dir]) == 0, capsys.readouterr().err
    eval_argv = shlex.split(evaluation)[2:]
    eval_argv[0] = os.path.join(run_dir, "last.pt")
    # The row's own --attacks run on 4 images, with AutoAttack shrunk to its first stage.
    attacks = eval_argv[eval_argv.index("--attacks") + 1] if "--attacks" in eval_argv \
        else evaluate.get_parser().get_default("attacks")
    assert evaluate.parse_attacks(attacks)  # the row's own list is valid
    cheap = ",".join(a.replace("aa", "apgd-ce") for a in attacks.split(","))  # AA's Square: minutes
    assert evaluate.main(eval_argv + ["--n", "4", "--attacks", cheap, "--out-dir", str(tmp_path / "eval")]) == 0, \
        capsys.readouterr().err
