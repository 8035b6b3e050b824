"""The paper's tables, one command each: train and evaluate every row, print the rows for a scheduler, smoke-test
every row on the device at hand, and set our figures beside the paper's.

  python tools/tables.py --table T1                      # run T1's rows (skips finished ones, continues others)
  python tools/tables.py --table T1 --print              # one shell line per row, for SLURM arrays / torchrun
  python tools/tables.py --table all --smoke             # every row, one tiny step on this device: starts or not
  python tools/tables.py --table T2 --seeds 0,1,2 --report   # the paper-vs-ours table from the results found

The rows, their commands and the paper's figures are read from docs/reproducing.md, the one place they are
written. A row's run lands in its command's --out-dir (seed s > 0: that name + "-s<s>", with --seed s), its
evaluation in <out-dir>/eval. The report (markdown, CSV, JSON and a Fig.-4-style picture of clean against
AutoAttack accuracy) goes to --report-dir.
"""
import argparse
import csv
import json
import os
import re
import shlex
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "reproducing.md")
DEFAULT_ATTACKS = "clean,pgd10,pgd20,pgd50,cw20,aa"  # evaluate.py's
CLASSES = {"cifar10": 10, "cifar100": 100}
# the smoke test's overrides: synthetic images of the row's shape and class count, one step, one attack step
SMOKE_TRAIN = ["--epochs", "1", "--dry-run", "--batch-size", "4", "--num-steps", "1", "--awp-warmup", "1",
               "--reweight-start", "1", "--sat-start", "1", "--eval-pgd-n", "4", "--workers", "0", "--overwrite"]
SMOKE_EVAL = ["--n", "8", "--dry-run", "--workers", "0", "--overwrite"]


class Row:
    """One row of docs/reproducing.md: its table, name, commands (as argv lists) and the paper's figures."""

    def __init__(self, table, name, train, evaluate, paper):
        self.table, self.name, self.train, self.evaluate = table, name, shlex.split(train), shlex.split(evaluate)
        given = self.flag(self.evaluate, "--attacks")
        self.attacks = (given or DEFAULT_ATTACKS).split(",")
        figures = [float(v) for v in re.findall(r"\d+(?:\.\d+)?", paper)]
        self.paper = dict(zip(self.attacks, figures)) if len(figures) == len(self.attacks) else {}
        self.out_dir = self.flag(self.train, "--out-dir")
        self.dataset = self.flag(self.train, "--dataset") or "cifar10"

    @staticmethod
    def flag(argv, name):
        return argv[argv.index(name) + 1] if name in argv else None

    def run_dir(self, seed, runs_dir=None):
        path = self.out_dir + (f"-s{seed}" if seed else "")
        return os.path.join(runs_dir, os.path.relpath(path, "runs")) if runs_dir else path

    def commands(self, seed, runs_dir=None, run=None, train_extra=("--resume",), eval_extra=("--resume",)):
        """(train argv, evaluate argv) for `seed`: the document's commands with the run's out-dir (`run`, else the
        row's), the seed and the evaluation's out-dir, then `*_extra` (by default --resume: each continued where it
        stopped or else started)."""
        run = run or self.run_dir(seed, runs_dir)
        out = self.train.index("--out-dir")
        train = [sys.executable, *self.train[1:out], *self.train[out + 2:], *["--seed", str(seed)] * bool(seed),
                 "--out-dir", run, *train_extra]
        ev = [sys.executable, self.evaluate[1], os.path.join(run, "last.pt"), *self.evaluate[3:],
              "--out-dir", os.path.join(run, "eval"), *eval_extra]
        return train, ev


def read_rows(doc=DOC):
    """Every row of the tables in `doc`: "| T1 name | `train` | other | `evaluate` | setting | paper | ours |"."""
    rows = []
    with open(doc) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            m = re.fullmatch(r"(T\d) (.+)", cells[0]) if len(cells) == 7 else None
            if m:
                train, evaluate = (re.search(r"`([^`]+)`", c)[1] for c in (cells[1], cells[3]))
                rows.append(Row(m[1], m[2], train, evaluate, cells[5]))
    return rows


def status(row, seed, runs_dir=None):
    """(state, accuracies or detail): finished, interrupted, failed or missing."""
    run = row.run_dir(seed, runs_dir)
    results = os.path.join(run, "eval", "results.json")
    if os.path.isfile(results):
        with open(results) as f:
            r = json.load(f)
        if r.get("complete") and all(a in r["accuracy"] for a in row.attacks):
            return "finished", {a: 100 * r["accuracy"][a] for a in row.attacks}
    failure = run.rstrip("/") + ".failed"
    if os.path.isfile(failure):
        with open(failure) as f:
            return "failed", f.read().strip()
    if any(os.path.exists(os.path.join(run, n)) for n in ("last.pt", "args.json", "eval")):
        return "interrupted", "run again to continue it"
    return "missing", "not run"


def run_row(row, seed, runs_dir, log):
    """Train and evaluate one row (each continued if it stopped); a failure is written beside the run."""
    failure = row.run_dir(seed, runs_dir).rstrip("/") + ".failed"  # beside the run: --resume reads its dir
    for argv in row.commands(seed, runs_dir):
        log(" ".join(shlex.quote(a) for a in argv))
        r = subprocess.run(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(r.stderr)
        if r.returncode != 0:
            os.makedirs(os.path.dirname(failure) or ".", exist_ok=True)
            last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            with open(failure, "w") as f:
                f.write(f"{os.path.basename(argv[1])} exited {r.returncode}: {last}\n")
            return False
    if os.path.isfile(failure):
        os.remove(failure)
    return True


def synthetic_images(folder, classes, per_class=1, size=32):
    """An ImageFolder of random RGB images of CIFAR's shape: train/<class>/ and test/<class>/."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class)):
        for c in range(classes):
            os.makedirs(os.path.join(folder, split, f"c{c:03d}"), exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    os.path.join(folder, split, f"c{c:03d}", f"{i}.png"))
    return folder


def smoke(rows, device, log):
    """Every row for one step of its real models on synthetic images of its shape, then its evaluation's attacks
    at their smallest: (row, None) if it ran, (row, the one-line error) if not."""
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="dynat-smoke-") as tmp:
        folders = {}
        for row in rows:
            classes = CLASSES.get(row.dataset, 10)
            if classes not in folders:
                folders[classes] = synthetic_images(os.path.join(tmp, f"images{classes}"), classes, per_class=1)
            run = os.path.join(tmp, "run")
            train, ev = row.commands(0, run=run, eval_extra=("--device", device, *SMOKE_EVAL),
                                     train_extra=("--dataset", "imagefolder", "--data-dir", folders[classes],
                                                  "--device", device, *SMOKE_TRAIN))
            t0, error = time.time(), None
            for argv in (train, ev):
                r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
                if r.returncode != 0:
                    error = f"{os.path.basename(argv[1])} exited {r.returncode}: " + \
                        (r.stderr.strip().splitlines() or ["(no message)"])[-1]
                    break
            shutil.rmtree(run, ignore_errors=True)  # a WRN-34-10 checkpoint is 0.4 GB
            log(f"{row.table} {row.name}: {'starts' if error is None else 'FAILS: ' + error} ({time.time() - t0:.0f} s)")
            outcomes.append((row, error))
    return outcomes


def report(rows, seeds, runs_dir, out_dir, log):
    """The paper-vs-ours table of `rows` (markdown, CSV, JSON) and the clean-vs-AutoAttack picture."""
    entries = []
    for row in rows:
        runs = [(seed, *status(row, seed, runs_dir)) for seed in seeds]
        done = [acc for _, state, acc in runs if state == "finished"]
        entry = {"table": row.table, "row": row.name, "seeds": seeds, "n": len(done),
                 "states": {str(seed): state if state == "finished" else f"{state}: {detail}"
                            for seed, state, detail in runs}, "columns": {}}
        for attack in row.attacks:
            ours = [acc[attack] for acc in done]
            mean = statistics.mean(ours) if ours else None
            entry["columns"][attack] = {"paper": row.paper.get(attack), "ours": mean,
                                        "std": statistics.stdev(ours) if len(ours) > 1 else None,
                                        "diff": None if mean is None or attack not in row.paper
                                        else mean - row.paper[attack]}
        entries.append(entry)
    os.makedirs(out_dir, exist_ok=True)
    name = "-".join(sorted({row.table for row in rows}))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(entries, f, indent=1)
    fmt = lambda v, sign="": "—" if v is None else f"{v:{sign}.2f}"
    lines = [f"| row | seeds done | attack | paper | ours (mean ± std) | ours − paper |", "|---|---|---|---:|---:|---:|"]
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "row", "attack", "paper", "ours_mean", "ours_std", "n", "diff", "states"])
        for e in entries:
            states = "; ".join(f"s{s}: {v}" for s, v in e["states"].items())
            for attack, c in e["columns"].items():
                w.writerow([e["table"], e["row"], attack, c["paper"], c["ours"], c["std"], e["n"], c["diff"], states])
                spread = f" ± {c['std']:.2f}" if c["std"] is not None else ""
                lines.append(f"| {e['table']} {e['row']} | {e['n']} of {len(seeds)} | {attack} | {fmt(c['paper'])} | "
                             f"{fmt(c['ours'])}{spread if c['ours'] is not None else ''} | {fmt(c['diff'], '+')} |")
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n\n" + "\n".join(f"- {e['table']} {e['row']}: " + "; ".join(
            f"seed {s} {v}" for s, v in e["states"].items()) for e in entries) + "\n")
    picture(entries, os.path.join(out_dir, f"{name}.png"))
    log("\n".join(lines))
    log(f"wrote {out_dir}/{name}.md, .csv, .json, .png")


def picture(entries, path):
    """Clean against AutoAttack accuracy, one point per row: the paper's hollow, ours filled (Fig. 4's axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, e in enumerate(entries):
        colour, clean, aa = f"C{i % 10}", e["columns"].get("clean", {}), e["columns"].get("aa", {})
        if clean.get("paper") is not None and aa.get("paper") is not None:
            ax.scatter(clean["paper"], aa["paper"], facecolors="none", edgecolors=colour, s=60)
        if clean.get("ours") is not None and aa.get("ours") is not None:
            ax.scatter(clean["ours"], aa["ours"], color=colour, s=60)
        ax.scatter([], [], color=colour, label=f"{e['table']} {e['row']}")
    ax.set(xlabel="clean accuracy (%)", ylabel="AutoAttack accuracy (%)",
           title="hollow: the paper's figure; filled: ours (mean over the seeds run)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Run, print, smoke-test or report the rows of the paper's tables "
                                "(docs/reproducing.md).")
    p.add_argument("--table", required=True, help="T1, T2, T3, T4, or all")
    p.add_argument("--rows", default=None, help="only the row of this name, else the rows whose name contains it")
    p.add_argument("--seeds", default="0", help="comma list of seeds (0: the command as written)")
    p.add_argument("--runs-dir", default=None, help="where runs go instead of the commands' runs/")
    p.add_argument("--report-dir", default="runs/tables", help="where the paper-vs-ours table goes")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print one shell line per row and seed; run nothing")
    mode.add_argument("--smoke", action="store_true", help="one tiny step of every row on --device: starts or not")
    mode.add_argument("--report", action="store_true", help="only write the table from the results found")
    p.add_argument("--device", default="auto", help="--smoke's device: auto, cpu, cuda or cuda:N")
    p.add_argument("--doc", default=DOC, help="the page the rows are read from")
    args = p.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # --print | head: no traceback
    for name in ("runs_dir", "report_dir", "doc"):  # the commands run from the repository: so does the rest
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    os.chdir(ROOT)
    log = lambda *a: print(*a, flush=True)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: a comma list of whole numbers")
    if not os.path.isfile(args.doc):
        p.error(f"{args.doc}: not found (the rows are read from it)")
    rows = [r for r in read_rows(args.doc) if args.table in ("all", r.table)]
    rows = [r for r in rows if r.name == args.rows] or [r for r in rows if (args.rows or "") in r.name]  # exact first
    if not rows:
        p.error(f"no rows for --table {args.table}" + (f" --rows {args.rows!r}" if args.rows else ""))
    if args.print:
        for row in rows:
            for seed in seeds:
                train, ev = row.commands(seed, args.runs_dir)
                log(" && ".join(" ".join(shlex.quote(a) for a in ["python", *argv[1:]]) for argv in (train, ev)))
        return 0
    if args.smoke:
        t0 = time.time()
        failed = [(row, error) for row, error in smoke(rows, args.device, log) if error]
        log(f"{len(rows) - len(failed)} of {len(rows)} rows start ({time.time() - t0:.0f} s)"
            + "".join(f"\nFAILS: {row.table} {row.name}: {error}" for row, error in failed))
        return 1 if failed else 0
    if not args.report:
        for row in rows:
            for seed in seeds:
                if status(row, seed, args.runs_dir)[0] == "finished":
                    log(f"{row.table} {row.name} seed {seed}: finished, skipped")
                elif not run_row(row, seed, args.runs_dir, log):
                    log(f"{row.table} {row.name} seed {seed}: failed ({status(row, seed, args.runs_dir)[1]})")
    report(rows, seeds, args.runs_dir, args.report_dir, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
