"""The Fashion-MNIST evidence in the paper's regime (docs/fashion-mnist-regime.md), from its runs' small results.

  python tools/regime_report.py          # rewrites the doc's generated sections and its two pictures

Reads docs/fashion-mnist-regime/runs/<method>-s<seed>/ (metrics.jsonl, args.json, eval/results.json; the
further evaluations eval_steps500/ and eval_aa500/), retrained/<method>-s<seed>/ (seed-0 models trained again
for AutoAttack where the table's checkpoint was gone: other weights, so never averaged into the table) and
pilots/*/ (the runs that chose the setting), and writes, between the doc's "<!-- generated: NAME -->" and
"<!-- end: NAME -->" lines, the verdict's table (each method's clean accuracy against PGD-AT's, with the standard
error of the difference, and its masked models), the table of every method (mean +- std over the seeds run, with
n, and each seed's figures), the AutoAttacked models beside their own figures, the step sweep, the regime's
measurements, and the pictures fashion-mnist-regime.png (clean against PGD-20, one point per run, one colour per
method) and fashion-mnist-regime-epochs.png (per epoch).
"""
import glob
import json
import os
import re
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "fashion-mnist-regime.md")
DIR = os.path.join(ROOT, "docs", "fashion-mnist-regime")
METHODS = {"clean": "no attack (a clean WRN-16-2: the room for a gain)", "pgd-at": "PGD-AT", "trades": "TRADES (β = 6)",
           "dynat-inner": "DYNAT-Inner", "dynat": "DYNAT (KL attack)", "dynat-inner-awp": "DYNAT-Inner-AWP (α = 1)",
           "dynat-inner-warmup": "DYNAT-Inner, guide warm-up 1"}
COLUMNS = ("clean", "pgd20", "cw20")
STEPS = ("pgd10", "pgd20", "pgd40")
AA_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
RETRAINED = "retrained"  # seed-0 models trained again for AutoAttack where the table's checkpoint was gone
MASKED = 20  # points of robust accuracy lost from PGD-10 to PGD-40 that call a model masked (the step sweep)


def load(path):
    with open(path) as f:
        return json.load(f) if path.endswith(".json") else [json.loads(line) for line in f]


def complete(path):
    """The evaluation's results.json at path if it ran to its end, else None."""
    results = load(path) if os.path.isfile(path) else None
    return results if results and results.get("complete") else None


def runs(where="runs"):
    """{method: [(seed, results or None, metrics rows)]}, in METHODS' order, from DIR/where/<method>-s<seed>/."""
    found = {}
    for d in sorted(d for d in glob.glob(os.path.join(DIR, where, "*")) if os.path.isdir(d)):
        name = re.fullmatch(r"(.+)-s(\d+)", os.path.basename(d))
        if name is None or name[1] not in METHODS:
            raise SystemExit(f"regime_report: {d}: a run's folder is named <method>-s<seed>, the method one of "
                             f"{', '.join(METHODS)}")
        if not os.path.isfile(os.path.join(d, "metrics.jsonl")):
            raise SystemExit(f"regime_report: {d} has no metrics.jsonl: copy the run's, or move the folder away")
        found.setdefault(name[1], []).append((int(name[2]), complete(os.path.join(d, "eval", "results.json")),
                                              load(os.path.join(d, "metrics.jsonl"))))
    return {m: sorted(found[m]) for m in METHODS if m in found}


def run_file(where, method, seed, *parts):
    return os.path.join(DIR, where, f"{method}-s{seed}", *parts)


def extra(method, seed, name, where="runs"):
    """A run's further evaluation (eval_steps500, eval_aa500) if it ran to its end, else None."""
    return complete(run_file(where, method, seed, name, "results.json"))


def every_run(found, retrained):
    """(where, label, method, seed, results, metrics rows) of the table's runs, then of the retrained ones."""
    for where, runs_, label in (("runs", found, ""), (RETRAINED, retrained, ", retrained")):
        for method, seeds in runs_.items():
            for seed, results, rows in seeds:
                yield where, label, method, seed, results, rows


def mean_std(values):
    if not values:
        return "—"
    return f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def aa_text(results):
    return f"{100 * results['accuracy']['aa']:.1f} (clean {100 * results['accuracy']['clean']:.1f})"


def table(found):
    lines = ["| method | n | clean | PGD-20 | C&W-20 | per seed: clean / PGD-20 / C&W-20 | AutoAttack, seed 0 (500) "
             "| training, each: minutes (median seconds an epoch) |", "|---|---:|---:|---:|---:|---|---|---|"]
    retrained_aa = False
    for method, seeds in found.items():
        done = [(s, r) for s, r, _ in seeds if r is not None]
        aa, again = extra(method, 0, "eval_aa500"), extra(method, 0, "eval_aa500", RETRAINED)
        retrained_aa = retrained_aa or (not aa and again)
        aa = aa_text(aa) if aa else f"{aa_text(again)}, retrained †" if again else "not yet"
        acc = {c: [100 * r["accuracy"][c] for _, r in done] for c in COLUMNS}
        per_seed = "; ".join(f"s{s}: " + " / ".join(f"{100 * r['accuracy'][c]:.1f}" for c in COLUMNS) for s, r in done)
        # the sum counts a pause (a run stopped while speed is measured) in its epoch; the median does not
        minutes = ", ".join(f"{sum(row['seconds'] for row in rows) / 60:.0f} "
                            f"({statistics.median(row['seconds'] for row in rows):.0f})" for _, _, rows in seeds)
        lines.append(f"| {METHODS[method]} | {len(done)} | {mean_std(acc['clean'])} | {mean_std(acc['pgd20'])} | "
                     f"{mean_std(acc['cw20'])} | {per_seed or 'running'} | {aa} | {minutes} |")
    if retrained_aa:
        lines.append("\n† AutoAttack of seed 0 trained again (retrained/): other weights than the seed-0 figures "
                     "beside it; that model's own clean, PGD-20 and C&W-20 are in the next table.")
    return "\n".join(lines)


def aa_stages(where, method, seed, results):
    """AutoAttack's accuracy (%) after each of its stages: results.json's aa_stages (evaluate.py from 5718708 on),
    else the counts a watcher polled from evaluate.py's state file into stages.txt, else None."""
    if set(results.get("aa_stages", ())) == set(AA_STAGES):
        return [100 * results["aa_stages"][stage] for stage in AA_STAGES]
    path = run_file(where, method, seed, "eval_aa500", "stages.txt")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        polled = re.findall(r"done=\[([a-z,-]+)\] robust=(\d+) pending 0\n", f.read())
    counts = {done.split(",")[-1]: int(robust) for done, robust in polled}
    if not all(stage in counts for stage in AA_STAGES[:-1]):  # a stage no poll saw between stages: no guess
        return None
    counts["square"] = results["accuracy"]["aa"] * results["n"]
    return [100 * counts[stage] / results["n"] for stage in AA_STAGES]


def square_broke(where, method, seed, results):
    """The points (%) Square took after the gradient stages, from the warning evaluate.py prints past AutoAttack's
    0.2 % of n, on stderr: the log.txt beside results.json holds both streams); "—" without a log."""
    path = run_file(where, method, seed, "eval_aa500", "log.txt")
    if not os.path.isfile(path):
        return "—"
    with open(path) as f:
        log = f.read()
    broke = re.search(r"Square broke (\d+) points", log)
    # here only for runs without whole stage counts, i.e. evaluated before 5718708, whose resumed warning counted
    # from where the last process began (fixed in e01991e): at least that
    at_least = "≥ " if log.count("\nevaluating ") + log.startswith("evaluating ") > 1 else ""
    return f"{at_least}{100 * int(broke[1]) / results['n']:.1f}" if broke else "≤ 0.2 (no warning in log.txt)"


def autoattack(found, retrained):
    """Every model that has AutoAttack, beside its own figures: the table's seed 0, or seed 0 trained again."""
    lines = ["| model | trained on | AutoAttack on | clean / PGD-20 / C&W-20 (images) | PGD-10 − PGD-40 (images) | "
             "AutoAttack (clean; images) | after APGD-CE / APGD-T / FAB-T / Square | Square took |",
             "|---|---|---|---|---:|---|---|---:|"]
    for where, label, method, seed, results, rows in every_run(found, retrained):
        aa = extra(method, seed, "eval_aa500", where)
        if aa is None:
            continue
        own = (" / ".join(f"{100 * results['accuracy'][c]:.1f}" for c in COLUMNS) + f" ({results['n']:,})"
               if results else "—")
        sweep = extra(method, seed, "eval_steps500", where)
        sweep = (f"{100 * (sweep['accuracy']['pgd10'] - sweep['accuracy']['pgd40']):.1f} ({sweep['n']:,})"
                 if sweep else "—")
        machine = ", ".join(sorted({r["machine"] for r in rows if r.get("machine")})) or "not recorded"
        after = aa_stages(where, method, seed, aa)
        square = f"{after[2] - after[3]:.1f}" if after else square_broke(where, method, seed, aa)
        after = " / ".join(f"{a:.1f}" for a in after) if after else "not recorded"
        lines.append(f"| {METHODS[method]} s{seed}{label} | {machine} | {aa.get('machine', 'not recorded')} | "
                     f"{own} | {sweep} | {100 * aa['accuracy']['aa']:.1f} ({100 * aa['accuracy']['clean']:.1f}; "
                     f"{aa['n']:,}) | {after} | {square} |")
    return "\n".join(lines)


def verdict(found):
    """Each method's clean accuracy against PGD-AT's (the claim), and how many of its models are masked."""
    lines = ["| row | n | clean | − PGD-AT | per seed, − PGD-AT's same seed | masked (PGD-10 − PGD-40 > "
             f"{MASKED} points) |", "|---|---:|---:|---:|---|---:|"]
    clean = {m: {s: 100 * r["accuracy"]["clean"] for s, r, _ in seeds if r} for m, seeds in found.items()}
    base = clean.get("pgd-at", {})
    for method, seeds in found.items():
        drops = [100 * (r["accuracy"]["pgd10"] - r["accuracy"]["pgd40"]) for r in
                 (extra(method, s, "eval_steps500") for s, _, _ in seeds) if r]
        values, diff, per_seed = list(clean[method].values()), "—", "—"
        if method != "pgd-at" and len(values) > 1 and len(base) > 1:
            se = (statistics.variance(values) / len(values) + statistics.variance(base.values()) / len(base)) ** 0.5
            diff = f"{statistics.mean(values) - statistics.mean(base.values()):+.1f} ± {se:.1f}"
        if method != "pgd-at" and set(clean[method]) & set(base):
            per_seed = ", ".join(f"s{s}: {c - base[s]:+.1f}" for s, c in clean[method].items() if s in base)
        lines.append(f"| {METHODS[method]} | {len(values)} | {mean_std(values)} | {diff} | {per_seed} | "
                     f"{sum(d > MASKED for d in drops)} of {len(drops)} |")
    return "\n".join(lines)


def steps(found, retrained):
    """Robust accuracy against more steps of the same attack: a model robust only to the attack it trained with
    (gradient masking) falls as the steps grow."""
    lines = ["| run | clean | PGD-10 | PGD-20 | PGD-40 | PGD-10 − PGD-40 |", "|---|---:|---:|---:|---:|---:|"]
    for where, label, method, seed, _, _ in every_run(found, retrained):
        r = extra(method, seed, "eval_steps500", where)
        if r:
            acc = [100 * r["accuracy"][c] for c in ("clean", *STEPS)]
            lines.append(f"| {METHODS[method]} s{seed}{label} | " + " | ".join(f"{a:.1f}" for a in acc)
                         + f" | {acc[1] - acc[-1]:.1f} |")
    return "\n".join(lines)


def regime(found):
    """The regime's measurements: the guide's agreement, the targets' per-epoch figures at the first decay."""
    lines = ["| run | dynamic labels = y (train), epochs 10 / 20 / 30 / 45 / 60 | first epoch >= 0.95 | guide clean "
             "(test), last | target clean / PGD-10 (test, 500), epochs 30; 44; 60 |", "|---|---|---:|---:|---|"]
    pilots = [(f"pilot {os.path.basename(d)}", load(os.path.join(d, "metrics.jsonl")),
               load(os.path.join(d, "args.json"))) for d in sorted(glob.glob(os.path.join(DIR, "pilots", "*")))]
    for name, rows, args in pilots + [(f"{METHODS[m]} s{s}", rows, {"num_steps": 10})
                                      for m, seeds in found.items() for s, _, rows in seeds]:
        at = {r["epoch"]: r for r in rows}
        agree = " / ".join(f"{at[e]['dynamic_label_acc']:.3f}" if e in at and at[e].get("dynamic_label_acc")
                           is not None else "—" for e in (10, 20, 30, 45, 60))
        first = next((r["epoch"] for r in rows if (r.get("dynamic_label_acc") or 0) >= 0.95), None)
        guide = next((f"{r['guide_clean_acc']:.3f} (epoch {r['epoch']})" for r in reversed(rows)
                      if r.get("guide_clean_acc") is not None), "—")
        evals = [r for r in rows if r.get("target_pgd_acc") is not None]
        target = "; ".join(f"{at[e]['target_clean_acc']:.3f} / {at[e]['target_pgd_acc']:.3f}"
                           if e in at and at[e].get("target_pgd_acc") is not None else "—" for e in (30, 44, 60))
        if args["num_steps"] == 0:  # a guide pilot: its target was never attacked
            target = "— (no attack: the guide's pilot)"
        elif target == "—; —; —" and evals:
            target = f"{evals[-1]['target_clean_acc']:.3f} / {evals[-1]['target_pgd_acc']:.3f} (epoch {evals[-1]['epoch']})"
        lines.append(f"| {name} | {agree} | {first or '—'} | {guide} | {target} |")
    return "\n".join(lines)


def pictures(found):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (method, seeds) in enumerate(found.items()):
        pts = [(100 * r["accuracy"]["clean"], 100 * r["accuracy"]["pgd20"]) for _, r, _ in seeds if r]
        if pts:
            ax.scatter(*zip(*pts), color=f"C{i}", label=METHODS[method], s=50)
    ax.set(xlabel="clean accuracy (%)", ylabel="PGD-20 accuracy (%)", title="Fashion-MNIST, the paper's regime "
           "(one point per run)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(os.path.join(os.path.dirname(DOC), "fashion-mnist-regime.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, layout="constrained")
    for i, (method, seeds) in enumerate(found.items()):
        seed, _, rows = seeds[0]
        evals = [r for r in rows if r.get("target_pgd_acc") is not None]
        top.plot([r["epoch"] for r in evals], [r["target_clean_acc"] for r in evals], color=f"C{i}",
                 label=f"{METHODS[method]} s{seed}: clean")
        top.plot([r["epoch"] for r in evals], [r["target_pgd_acc"] for r in evals], color=f"C{i}", linestyle="--",
                 label=f"{METHODS[method]} s{seed}: PGD-10")
        if rows[0].get("dynamic_label_acc") is not None:
            bottom.plot([r["epoch"] for r in rows], [r["dynamic_label_acc"] for r in rows], color=f"C{i}",
                        label=f"{METHODS[method]} s{seed}")
    for j, d in enumerate(sorted(glob.glob(os.path.join(DIR, "pilots", "*")))):
        rows = load(os.path.join(d, "metrics.jsonl"))
        if rows[0].get("dynamic_label_acc") is not None and not os.path.basename(d).startswith("eps8"):
            bottom.plot([r["epoch"] for r in rows], [r["dynamic_label_acc"] for r in rows], color="grey",
                        alpha=0.3 + 0.7 * ("noaug" in d), linewidth=0.8, label=f"pilot {os.path.basename(d)}")
    bottom.axhline(0.95, color="black", linewidth=0.5)
    top.set(ylabel="target accuracy (test)", title="targets per epoch (seed 0)")
    bottom.set(ylabel="dynamic labels = y (train)", xlabel="epoch", title="the guide: runs and pilots")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(os.path.join(os.path.dirname(DOC), "fashion-mnist-regime-epochs.png"), dpi=100)
    plt.close(fig)


def main():
    """Everything from the files under DIR; DOC's generated sections rewritten, the rest of it left as it is."""
    found, retrained = runs(), runs(RETRAINED)  # no retrained/ folder: none
    with open(DOC) as f:
        text = f.read()
    for name, body in (("verdict", verdict(found)), ("table", table(found)),
                       ("autoattack", autoattack(found, retrained)), ("steps", steps(found, retrained)),
                       ("regime", regime(found))):
        text, count = re.subn(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)",
                              lambda m: m[1] + body + "\n" + m[2], text, flags=re.S)
        assert count == 1, name
    with open(DOC, "w") as f:
        f.write(text)
    pictures(found)
    print(f"wrote {DOC} and its pictures from {sum(len(s) for s in found.values())} runs")


if __name__ == "__main__":
    main()
