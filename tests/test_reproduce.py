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
          "--reweight-start", "1", "--awp-warmup", "1", "--sat-start", "1"]


def table_rows():
    """(row, train command, evaluate command, setting) for every table row with commands; a row's other readings
    come as (row + " [release]", ...) and (row + " [CE on y]", ...)."""
    with open(os.path.join(ROOT, "docs", "reproducing.md")) as f:
        section = f.read()
    rows = []
    for line in section.splitlines():
        if not line.startswith("| "):
            continue
        trains = re.findall(r"`(python dynat\.py [^`]*)`", line)
        evaluations = re.findall(r"`(python evaluate\.py [^`]*)`", line)
        if trains or evaluations:
            cells = [c.strip() for c in line.split("|")]
            assert len(evaluations) == 1 and len(trains) in (1, 2, 3), line
            for suffix, train in zip(("", " [release]", " [CE on y]"), trains):
                rows.append((cells[1] + suffix, train, evaluations[0], cells[5] if len(cells) > 7 else ""))
    return rows


ROWS = table_rows()
EVALUATED = set()  # the --attacks lists an evaluation already ran on a row's checkpoint


def test_the_table_has_every_paper_row_with_its_setting():
    paper = [r for r in ROWS if r[0].startswith("T") and "[" not in r[0]]
    assert len(paper) == 33 and all(setting for _, _, _, setting in paper)  # every row names its setting's source
    assert sum(name.endswith("[release]") for name, _, _, _ in ROWS) == 7  # every DYNAT row of Tables 1 and 2
    assert sum(name.endswith("[CE on y]") for name, _, _, _ in ROWS) == 2  # the plain DYNAT rows' third reading
    names = " ".join(name for name, _, _, _ in paper)
    for method in ("T1 PGD-AT", "T1 TRADES", "T1 MART", "T1 FAT", "T1 GAIRAT", "T1 AWP", "T1 LBGAT", "T1 DYNAT ",
                   "DYNAT-AWP (α=0)", "DYNAT-AWP (α=1)", "T1 DYNAT-Inner-AWP", "T2 TRADES", "T2 SAT", "T2 LBGAT (α=6)",
                   "T2 DYNAT-AWP", "T2 DYNAT-Inner-AWP", "DYNAT-Inner-GAIRAT, WRN-34-10 target",
                   "DYNAT-Inner-GAIRAT, ResNet-18 target", "T4 MART", "T4 FAT", "DYNAT-AT-MAIL", "DYNAT-MAIL-Inner"):
        assert method in names, method


def test_each_baseline_row_takes_its_methods_setting():
    """Spot checks against the releases: GAIRAT's and MAIL's schedules in Tables 3 and 4, the static-label
    baselines without the DYNAT release's clean forward, T2 LBGAT's alpha 6, release-equivalents in float32."""
    rows = {name: train for name, train, _, _ in ROWS}
    for name in ("T3 GAIRAT, WRN-34-10", "T3 DYNAT-Inner-GAIRAT, WRN-34-10 target, ResNet-18 guide"):
        assert "--epochs 120 --lr-milestones 60,90,110 --lr-factors 0.1,0.01,0.005" in rows[name]
        assert "--start uniform" in rows[name] and "--step-size 0.007" in rows[name]
    for name in ("T4 MAIL (MAIL-AT)", "T4 DYNAT-AT-MAIL", "T4 DYNAT-MAIL-Inner"):
        assert "--lr 0.01 --weight-decay 3.5e-3 --epochs 120 --lr-milestones 76,91,101" in rows[name]
    for name in ("T1 PGD-AT", "T1 AWP (AT-AWP)", "T1 GAIRAT", "T1 FAT", "T1 MART", "T4 MAIL (MAIL-AT)"):
        assert "--no-clean-bn" in rows[name], name
    assert "--alpha 6" in rows["T2 LBGAT (α=6)"]
    assert all("--amp none" in train for name, train in rows.items() if name.endswith("[release]"))


@pytest.mark.parametrize("name,train,evaluation", [r[:3] for r in ROWS], ids=[r[0] for r in ROWS])
def test_table_command_runs_one_step(name, train, evaluation, tmp_path, capsys):
    train_argv = shlex.split(train)[2:]
    out_dir = train_argv[train_argv.index("--out-dir") + 1]
    if "[" not in name:
        assert evaluation.split()[2] == f"{out_dir}/last.pt", "evaluate.py must read the row's own run"
    run_dir = str(tmp_path / out_dir)
    assert dynat.main(train_argv + SHRINK + ["--out-dir", run_dir]) == 0, capsys.readouterr().err
    eval_argv = shlex.split(evaluation)[2:]
    eval_argv[0] = os.path.join(run_dir, "last.pt")
    attacks = evaluate.get_parser().parse_args(eval_argv).attacks
    assert evaluate.parse_attacks(attacks)  # the row's own list is valid
    if attacks in EVALUATED:  # the same evaluate.py command but for its checkpoint: ran once already
        return
    EVALUATED.add(attacks)
    # The row's own --attacks run on 4 images, with AutoAttack shrunk to its first stage.
    cheap = ",".join(a.replace("aa", "apgd-ce") for a in attacks.split(","))  # AA's Square: minutes
    assert evaluate.main(eval_argv + ["--n", "4", "--attacks", cheap, "--out-dir", str(tmp_path / "eval")]) == 0, \
        capsys.readouterr().err
