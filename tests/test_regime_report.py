"""tools/regime_report.py writes the evidence page's generated sections and pictures from its runs' files."""
import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import regime_report  # noqa: E402


def write_run(folder, accuracy, epochs=4, agreement=0.9, machine=None):
    os.makedirs(folder / "eval")
    # 60 s an epoch, and 6 minutes more in the last (a run paused while speed was measured)
    rows = [{"epoch": e, "seconds": 60.0 + 360 * (e == epochs), "dynamic_label_acc": agreement, "guide_clean_acc": 0.8,
             "target_clean_acc": 0.7, "target_pgd_acc": 0.6, "machine": machine} for e in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "args.json").write_text(json.dumps({"num_steps": 10}))
    (folder / "eval" / "results.json").write_text(json.dumps({"complete": True, "n": 1000, "accuracy": accuracy}))


def test_the_table_gives_mean_std_and_n_per_method_and_the_pictures_are_drawn(tmp_path, monkeypatch):
    doc = tmp_path / "docs" / "fashion-mnist-regime.md"
    folder = tmp_path / "docs" / "fashion-mnist-regime"
    os.makedirs(folder / "pilots")
    shutil.copy(regime_report.DOC, doc)
    write_run(folder / "runs" / "pgd-at-s0", {"clean": 0.70, "pgd20": 0.60, "cw20": 0.58})
    write_run(folder / "runs" / "pgd-at-s1", {"clean": 0.72, "pgd20": 0.62, "cw20": 0.60})
    write_run(folder / "runs" / "dynat-inner-s0", {"clean": 0.75, "pgd20": 0.61, "cw20": 0.59}, agreement=0.96)
    write_run(folder / "runs" / "dynat-inner-s1", {"clean": 0.77, "pgd20": 0.63, "cw20": 0.61})
    for run, name, results in (("pgd-at-s0", "eval_aa500", {"complete": True, "n": 500, "accuracy": {
                                   "clean": 0.7, "aa": 0.55}}),
                               ("pgd-at-s1", "eval_aa500", {"complete": True, "n": 500, "accuracy": {
                                   "clean": 0.72, "aa": 0.57}, "aa_stages": {"square": 0.57}}),  # partial: ignored
                               ("dynat-inner-s0", "eval_aa500", {"complete": False, "accuracy": {"clean": 0.7}}),
                               ("dynat-inner-s0", "eval_steps500", {"complete": True, "accuracy": {
                                   "clean": 0.76, "pgd10": 0.6, "pgd20": 0.4, "pgd40": 0.3}})):
        os.makedirs(folder / "runs" / run / name)
        (folder / "runs" / run / name / "results.json").write_text(json.dumps(results))
    # AutoAttack's count after each stage, polled into stages.txt by a watcher (before results.json had them);
    # for seed 1, whose stages.txt missed FAB-T's, the warning in its log: a resumed run's, so a lower bound
    (folder / "runs" / "pgd-at-s0" / "eval_aa500" / "stages.txt").write_text(
        "2026-12-06T00:14:05Z done=[apgd-ce] robust=300 pending 0\n2026-12-06T00:39:08Z done=[apgd-ce,apgd-t] "
        "robust=290 pending 0\n2026-12-06T01:03:49Z done=[apgd-ce,apgd-t,fab-t] robust=285 pending 0\n"
        "2026-12-06T01:04:09Z done=[apgd-ce,apgd-t,fab-t] robust=281 pending 53\n")
    (folder / "runs" / "pgd-at-s1" / "eval_aa500" / "stages.txt").write_text(
        "2026-12-06T00:14:05Z done=[apgd-ce] robust=300 pending 0\n2026-12-06T00:39:08Z done=[apgd-ce,apgd-t] "
        "robust=290 pending 0\n")
    (folder / "runs" / "pgd-at-s1" / "eval_aa500" / "log.txt").write_text(
        "evaluating last.pt\nclean accuracy: 72.00%\nevaluating last.pt\nclean accuracy: 72.00%\n"
        "warning: Square broke 4 points that survived the gradient attacks: gradient masking?\nAA: 57.00%\n")
    # seed 0 of TRADES trained again elsewhere for its AutoAttack: other weights, so not in TRADES's row's figures
    write_run(folder / "retrained" / "trades-s0", {"clean": 0.80, "pgd20": 0.50, "cw20": 0.49}, machine="Xeon, 1 thread")
    for name, results in (("eval_aa500", {"complete": True, "n": 100, "accuracy": {"clean": 0.81, "aa": 0.42},
                                          "machine": "Xeon, 1 thread",
                                          "aa_stages": {"apgd-ce": 0.5, "apgd-t": 0.45, "fab-t": 0.45, "square": 0.42}}),
                          ("eval_steps500", {"complete": True, "n": 500, "accuracy": {
                              "clean": 0.81, "pgd10": 0.52, "pgd20": 0.5, "pgd40": 0.45}})):
        os.makedirs(folder / "retrained" / "trades-s0" / name)
        (folder / "retrained" / "trades-s0" / name / "results.json").write_text(json.dumps(results))
    os.makedirs(folder / "runs" / "trades-s0")  # running: its epochs so far, no results yet
    (folder / "runs" / "trades-s0" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "seconds": 60.0}) + "\n")
    monkeypatch.setattr(regime_report, "DOC", str(doc))
    monkeypatch.setattr(regime_report, "DIR", str(folder))
    regime_report.main()
    text = doc.read_text()
    assert ("| PGD-AT | 2 | 71.0 ± 1.4 | 61.0 ± 1.4 | 59.0 ± 1.4 | s0: 70.0 / 60.0 / 58.0; s1: 72.0 / 62.0 / 60.0 | "
            "55.0 (clean 70.0) | 10 (60), 10 (60) |") in text  # AutoAttack of seed 0, once complete; minutes in all
    # and the median epoch's seconds, which a pause does not move
    assert ("| DYNAT-Inner | 2 | 76.0 ± 1.4 | 62.0 ± 1.4 | 60.0 ± 1.4 | s0: 75.0 / 61.0 / 59.0; s1: 77.0 / 63.0 / 61.0 "
            "| not yet | 10 (60), 10 (60) |") in text  # AA unfinished
    # the verdict: clean against PGD-AT's (± the standard error of the difference), seed by seed, and the models
    # whose robust accuracy falls more than 20 points from PGD-10 to PGD-40 (only s0 had the step sweep)
    assert "| DYNAT-Inner | 2 | 76.0 ± 1.4 | +5.0 ± 1.4 | s0: +5.0, s1: +5.0 | 1 of 1 |" in text
    assert "| PGD-AT | 2 | 71.0 ± 1.4 | — | — | 0 of 0 |" in text
    # TRADES's seed 0 has no results yet; its retrained model's AutoAttack is shown, marked, and its own figures
    # sit beside it in the AutoAttack table, not in TRADES's mean
    assert "| TRADES (β = 6) | 0 | — | — | — | running | 42.0 (clean 81.0), retrained † | 1 (60) |" in text
    assert "† AutoAttack of seed 0 trained again (retrained/)" in text
    # each with the accuracy after each AutoAttack stage and what Square took after the gradient stages: from
    # results.json's aa_stages, else stages.txt, else (Square's share only) the warning in log.txt
    assert ("| TRADES (β = 6) s0, retrained | Xeon, 1 thread | Xeon, 1 thread | 80.0 / 50.0 / 49.0 (1,000) | 7.0 (500) "
            "| 42.0 (81.0; 100) | 50.0 / 45.0 / 45.0 / 42.0 | 3.0 |") in text
    assert ("| PGD-AT s0 | not recorded | not recorded | 70.0 / 60.0 / 58.0 (1,000) | — | 55.0 (70.0; 500) | "
            "60.0 / 58.0 / 57.0 / 55.0 | 2.0 |") in text  # FAB-T's line polled mid-Square (pending 53) is not FAB-T's
    assert ("| PGD-AT s1 | not recorded | not recorded | 72.0 / 62.0 / 60.0 (1,000) | — | 57.0 (72.0; 500) | "
            "not recorded | ≥ 0.8 |") in text
    assert "| DYNAT-Inner s0 | not recorded" not in text  # its AutoAttack never completed
    assert "| TRADES (β = 6) s0, retrained | 81.0 | 52.0 | 50.0 | 45.0 | 7.0 |" in text  # its step sweep
    assert "| DYNAT-Inner s0 | 76.0 | 60.0 | 40.0 | 30.0 | 30.0 |" in text and "| PGD-AT s0 | 70.0 |" not in text  # steps
    assert "| DYNAT-Inner s0 | — / — / — / — / — | 1 | 0.800 (epoch 4) | 0.700 / 0.600 (epoch 4) |" in text  # 4 epochs:
    # agreement >= 0.95 from epoch 1, no epoch 30: the target's last evaluation
    assert (doc.parent / "fashion-mnist-regime.png").stat().st_size > 1000
    assert (doc.parent / "fashion-mnist-regime-epochs.png").stat().st_size > 1000
    regime_report.main()  # again: the generated sections are replaced, not repeated
    assert doc.read_text() == text
    (folder / "runs" / "README.md").write_text("a note beside the runs: not a run")  # a file: passed over
    regime_report.main()
    assert doc.read_text() == text
    os.makedirs(folder / "retrained" / "trades-s0-xeon")  # folders the report cannot place: refused by name
    with pytest.raises(SystemExit, match="trades-s0-xeon: a run's folder is named <method>-s<seed>"):
        regime_report.main()
    os.rename(folder / "retrained" / "trades-s0-xeon", folder / "retrained" / "dynat-s0")
    with pytest.raises(SystemExit, match="dynat-s0 has no metrics.jsonl"):
        regime_report.main()
    assert doc.read_text() == text
