"""Evaluate a dynat.py checkpoint under the attacks of the paper's tables (SPEC 6, Tables 1-4).

  python evaluate.py runs/dynat/last.pt                                 # Clean, PGD-10/20/50, C&W-20, AA
  python evaluate.py runs/dynat/last.pt --attacks aa --n 1000 --epsilon 0.031   # the released script's AA
  python evaluate.py trades.pt --arch wrn-34-10 --dataset cifar10       # a plain state_dict from elsewhere

Threat model: white box, L-inf ball of radius eps = 8/255 around [0, 1] pixels. A test point counts as
robust under an attack only if the model classifies it correctly clean *and* at every point the attack
returned (every restart), AutoAttack's convention; so no column exceeds Clean.
  PGD-k, C&W-k   dynat.perturb, the training attack: k signed steps of --step-size from a uniform
                 start in the eps-ball, on CE / on the margin loss -(z_y - max_{j!=y} z_j)
  APGD-CE, APGD-T, FAB-T, Square   AutoAttack's components with its "standard" settings
  AA             AutoAttack "standard": the four above in turn, each on the points still robust
  All            mean over the attack columns (the paper's "All", Table 1)
  Worst          per-example worst case: robust only if a point survives every attack run
Writes to --out-dir: results.md (the table), results.json, per_example.npz (one bool per test image
and attack) and autoattack_<attack>.json (AutoAttack's flags, saved after every batch, and its robust count
after each stage; results.json's aa_stages gives them as accuracies: what each stage took). An
interrupted run continues with --resume: finished attacks are kept, AutoAttack goes on from its last
batch, and since every attack is reseeded with --seed the numbers are those of an uninterrupted run.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import os
import re
import sys
import time

import numpy as np
import pyautoattack
import torch

import dynat
import dynat_runs as runs

with runs.ours("models", "data"):
    import data  # noqa: E402  (ours: models.py and data.py beside this file, even beside a research repo's models/)
    import models  # noqa: E402

AA_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")  # AutoAttack "standard", in its order
AUTOATTACK = AA_STAGES + ("aa",)
COLUMNS = {"clean": "Clean", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square",
           "aa": "AA"}
# --resume refuses an out-dir evaluated with other values of these: they change the numbers.
# batch_size too: AutoAttack draws its random starts per batch.
SETTINGS = ("checkpoint_sha256", "model", "arch", "dataset", "images_sha256", "n", "norm", "epsilon", "step_size",
            "restarts", "seed", "amp", "batch_size", "device",  # device: another device's kernels round differently
            "dry_run")
MODELS = {"target": "target", "guide": "guide", "target-ema": "ema"}  # --model: the checkpoint's key
NORMS = {"linf": "L-inf", "l2": "L2"}


def get_parser():
    """evaluate.py's flags; a setting it shares with dynat.py is that one's definition (Config's field, or
    dynat_runs.FLAGS's entry), its default here the checkpoint's where that is the natural one."""
    p = argparse.ArgumentParser(description="Robust accuracy of a DYNAT checkpoint (the paper's table columns).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("checkpoint", help="last.pt / best.pt written by dynat.py, or a plain state_dict (then --arch, --dataset)")
    a("--model", default="target", choices=list(MODELS),
      help="which model of the checkpoint: f_t, f_g, or the average of f_t's weights (dynat.py --ema)")
    a("--attacks", default="clean,pgd10,pgd20,pgd50,cw20,aa",
      help="comma list of clean, pgdK, cwK (any K), apgd-ce, apgd-t, fab-t, square, aa; clean always runs")
    a("--n", type=int, default=None, help="evaluate the first N test images (unset: the whole test set)")
    a("--out-dir", default=None,
      help="where results go (unset: <checkpoint dir>/eval_<checkpoint name>_<model>_<digest of the settings>)")
    a("--resume", action="store_true", help="continue the evaluation in --out-dir if it holds one with the same "
      "settings (finished attacks are kept; a finished one is printed again), else start it")
    a("--overwrite", action="store_true", help="start again in an --out-dir that holds an earlier evaluation")
    a("--dry-run", action="store_true", help="smoke tests: PGD/C&W of one step, AutoAttack's stages of one iteration, "
      "one target class and 10 Square queries (the numbers mean nothing)")

    g = p.add_argument_group("threat model (norm, radius and step unset: the checkpoint's) and attacks")
    # the radius and step depend on --norm: "%(default).0s" keeps argparse from appending "(default: None)"
    dynat.config_flag(g, "norm", default=None, help="threat model (unset: the checkpoint's, else linf)")
    dynat.config_flag(g, "epsilon", default=None, type=runs.fraction,
                      help="radius: 8/255 (L-inf; or 0.031), 128/255 (L2; RobustBench's leaderboard: 0.5)%(default).0s")
    dynat.config_flag(g, "step_size", default=None, type=runs.fraction,
                      help="PGD / C&W step: 2/255 (L-inf), 15/255 (L2)%(default).0s")
    g.add_argument("--restarts", type=int, default=1, help="PGD / C&W random starts; robust = survives all of them")
    runs.add_flags(g, "seed", seed=dict(help="seed of the random starts (every attack is reseeded with it)"))

    g = p.add_argument_group("data, device and precision")
    runs.add_flags(g, "dataset", "data_dir", "workers", "device", "batch_size",
                   dataset=dict(default=None, help="test data (unset: the checkpoint's; required for a plain "
                                "state_dict)"),
                   data_dir=dict(default=None, help="where the dataset lives (unset: the checkpoint's, else ./data)"),
                   batch_size=dict(default=256, help="images per attack batch"))
    g.add_argument("--arch", default=None, help="architecture of a plain state_dict: resnet18 or wrn-D-K, "
                   "e.g. wrn-34-10")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast precision of PGD / C&W (AutoAttack and clean always run in float32; the published "
                   "columns are float32; fp16 is refused: its input gradient underflows and PGD stops moving)")
    return p


def parse_attacks(text):
    """'clean,pgd10,cw20,aa' -> ['pgd10', 'cw20', 'aa']: validated, deduplicated, clean left out."""
    names = []
    for name in (s.strip().lower() for s in text.split(",")):
        if name in ("", "clean") or name in names:
            continue
        if name not in AUTOATTACK and not re.fullmatch(r"(pgd|cw)[1-9]\d*", name):
            raise runs.UsageError(f"--attacks: unknown attack {name!r}; expected clean, pgdK, cwK (K >= 1), "
                                  + ", ".join(AUTOATTACK))
        names.append(name)
    return names


def column(name):
    """Table header of an attack: pgd20 -> PGD-20, cw20 -> C&W-20, aa -> AA."""
    m = re.fullmatch(r"(pgd|cw)(\d+)", name)
    return f"{'PGD' if m[1] == 'pgd' else 'C&W'}-{m[2]}" if m else COLUMNS[name]


def images_sha256(x, y):
    """Names the test images evaluated: two image folders of one dataset name never share an out-dir."""
    h = hashlib.sha256(x.contiguous().numpy().tobytes())
    h.update(y.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path):
    """Names the weights evaluated: --resume refuses an out-dir evaluated on other weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- model and data

def resolve_checkpoint(args, log):
    """(state_dict, arch, dataset, data_dir, classes, norm) of the model to evaluate; classes None = the data's,
    norm the one it was trained against (None: unknown)."""
    ckpt = runs.load_checkpoint(args.checkpoint)
    if not isinstance(ckpt, dict):
        raise runs.UsageError(f"{args.checkpoint}: not a checkpoint (holds a {type(ckpt).__name__})")
    if "args" in ckpt:  # written by dynat.py: architecture, data and class count come from its flags
        try:
            saved = ckpt["args"]
            key = MODELS[args.model]
            state, classes = ckpt.get(key), ckpt["classes"]
            arch = args.arch or saved["guide" if key == "guide" else "target"]
            dataset, data_dir = args.dataset or saved["dataset"], args.data_dir or saved["data_dir"]
        except (KeyError, TypeError) as e:
            raise runs.UsageError(f"{args.checkpoint}: not a dynat.py checkpoint (no {e})")
        if state is None:
            why = "trained with --labels true" if key == "guide" else "trained without --ema"
            raise runs.UsageError(f"{args.checkpoint} holds no {args.model} model ({why})")
        return state, arch, dataset, data_dir, classes, saved.get("norm", "linf")
    # A plain state_dict from another codebase: the user says what it is.
    if not (args.arch and args.dataset):
        raise runs.UsageError(f"{args.checkpoint} is a plain state_dict (no saved args): pass --arch and --dataset")
    if isinstance(ckpt.get("state_dict"), dict):
        log(f"{args.checkpoint}: using its 'state_dict' entry")
        ckpt = ckpt["state_dict"]
    return ckpt, args.arch, args.dataset, args.data_dir or "./data", None, None


# ----------------------------------------------------------------------------- attacks

def autoattack(model, x, y, robust, name, *, norm, epsilon, seed, batch_size, device, classes, state_path, progress,
               dry_run=False):
    """Robust flags under AutoAttack "standard" (name "aa") or one of its stages, in float32.

    This is run_standard_evaluation's own loop, one library call per batch and stage: each stage
    attacks the points still robust, in batches of `batch_size` in index order, with the library's
    seeding, so the flags are those of one standard call (a test checks it). Doing the loop here
    lets the flags be saved to `state_path` after every batch, so an interrupted run continues
    exactly where it stopped. (pyautoattack 0.2.0's own state file cannot be resumed: it stores the
    attack set as a str() it then fails to match, and a restored run crashes on an unset y_adv.)
    progress(total, desc) makes one bar per stage, whose total (the points it attacks) is known."""
    state = aa_state(state_path) or {"done": [], "pending": None, "robust": robust.tolist()}
    robust, started, earlier = torch.tensor(state["robust"]), time.time(), state.get("seconds", 0.0)

    def save(**changes):  # with the seconds so far, an interrupted process's included
        state.update(changes, seconds=earlier + time.time() - started)
        runs.write_atomic(state_path, lambda f: json.dump(state, f), "w")
    aa = pyautoattack.AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=epsilon, version="standard",
                                 seed=seed, device=device)
    # The standard 9 target classes need 10 classes; with fewer, APGD-T/FAB-T would index past the logits.
    aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = min(9, classes - 1)
    if dry_run:  # every stage runs, at its smallest
        aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = 1
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = 1
        aa.square.n_queries = 10
    stages = AA_STAGES if name == "aa" else [name]
    try:
        for number, stage in enumerate(stages, 1):
            if stage in state["done"]:
                continue
            # One stage with the "standard" settings, as the library's run_standard_evaluation_individual
            # does (version="custom" would give APGD-CE 5 restarts instead of 1).
            aa.attacks_to_run = [stage]
            pending = (robust.nonzero().squeeze(1) if state["pending"] is None
                       else torch.tensor(state["pending"], dtype=torch.long))
            # the count when the stage began, recorded by the process that began it where it was interrupted
            robust_before = state.get("robust_after", {}).get(stages[number - 2]) if number > 1 else None
            robust_before = int(robust.sum()) if robust_before is None else robust_before
            with progress(len(pending), f"{column(name)} {number}/{len(stages)} {stage}") as bar:
                while len(pending):
                    batch, pending = pending[:batch_size], pending[batch_size:]
                    y_batch = y[batch].to(device)
                    # y_adv: predictions on x_adv, the clean point where the stage found nothing.
                    x_batch = data.to_input(x[batch], device)
                    _, y_adv = aa.run_standard_evaluation(x_batch, y_batch, batch_size=len(batch))
                    robust[batch] = (y_adv == y_batch).cpu()
                    save(robust=robust.tolist(), pending=pending.tolist())
                    bar.update(len(batch))
            # the robust count after each stage: how much each attack added (Square's share is the masking check's)
            save(done=state["done"] + [stage], pending=None,
                 robust_after={**state.get("robust_after", {}), stage: int(robust.sum())})
            if name == "aa":
                print(f"AA after {stage}: {int(robust.sum())}/{len(robust)} robust", flush=True)
            if name == "aa" and stage == "square" and robust_before - int(robust.sum()) > 0.002 * len(robust):
                # AutoAttack's check_square_sr: a black-box attack beating the gradient attacks.
                print(f"warning: Square broke {robust_before - int(robust.sum())} points that survived the gradient "
                      "attacks: gradient masking? (the AA number may overstate robustness)", file=sys.stderr)
    except BaseException:  # stopped or failed: the seconds since its last batch count in a resumed run's too
        save()
        raise
    return robust


def aa_state(path):
    """AutoAttack's saved state (its flags, the stages done, the robust count after each, the seconds so far),
    or None where there is none."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- outputs

def pgd_settings(meta):
    """', PGD/C&W step 2/255, 1 restart(s)' when PGD or C&W ran; '' for an AutoAttack-only evaluation."""
    if not any(re.fullmatch(r"(pgd|cw)\d+", a) for a in meta["attacks"]):
        return ""
    return f", PGD/C&W step {runs.fmt_fraction(meta['step_size'])}, {meta['restarts']} restart(s)"


def summary(masks):
    """Per-attack accuracy, the paper's "All" (mean over the attacks, clean excluded) and the
    per-example worst case (robust only against every attack; clean alone if none ran)."""
    accuracy = {name: m.double().mean().item() for name, m in masks.items()}
    attacks = [name for name in masks if name != "clean"]
    worst = torch.stack(list(masks.values())).all(0)
    mean = sum(accuracy[a] for a in attacks) / len(attacks) if attacks else None
    return accuracy, mean, worst


def table(meta, accuracy, mean, worst):
    """Markdown header, separator and row in the paper's layout (percent, two decimals), plus Worst."""
    names = list(accuracy)
    head = ["Model"] + [column(a) for a in names] + (["All"] if mean is not None else []) + ["Worst"]
    values = [accuracy[a] for a in names] + ([mean] if mean is not None else []) + [worst.double().mean().item()]
    label = f"{os.path.basename(meta['checkpoint'])} [{meta['model']}: {meta['arch']}]"
    return ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|",
            "| " + " | ".join([label] + [f"{100 * v:.2f}" for v in values]) + " |"]


def save_outputs(out_dir, meta, masks, seconds, complete):
    """results.json, per_example.npz and results.md, rewritten after every attack; columns in --attacks' order."""
    masks = {a: masks[a] for a in meta["attacks"] if a in masks}
    accuracy, mean, worst = summary(masks)
    arrays = {a: m.numpy() for a, m in masks.items()}
    # The arrays first: --resume trusts an attack only once results.json lists it.
    runs.write_atomic(os.path.join(out_dir, "per_example.npz"), lambda f: np.savez(f, **arrays, worst=worst.numpy()), "wb")
    results = dict(meta, accuracy=accuracy, all=mean, worst=worst.double().mean().item(),
                   seconds={a: round(s, 3) for a, s in seconds.items()}, complete=complete)
    after = {}
    if "aa" in masks:  # AutoAttack's state, read only where AA ran (this runs after every attack)
        after = (aa_state(os.path.join(out_dir, "autoattack_aa.json")) or {}).get("robust_after", {})
    if all(stage in after for stage in AA_STAGES):  # not where a state from before they were kept was resumed
        results["aa_stages"] = {stage: after[stage] / meta["n"] for stage in AA_STAGES}
    runs.write_atomic(os.path.join(out_dir, "results.json"), lambda f: json.dump(results, f, indent=1), "w")
    lines = table(meta, accuracy, mean, worst)
    header = (f"{meta['dataset']}, first {meta['n']} of {meta['n_test']} test images, {NORMS[meta['norm']]} eps = "
              f"{runs.fmt_fraction(meta['epsilon'])}{pgd_settings(meta)}, seed {meta['seed']}; accuracy in %; precision: "
              + ", ".join(f"{column(a)} {p}" for a, p in meta["precision"].items()))
    runs.write_atomic(os.path.join(out_dir, "results.md"), lambda f: f.write("\n".join([header, ""] + lines) + "\n"), "w")
    return header, lines


def robustbench_info(out_dir, meta, masks):
    """robustbench_model_info.json: clean and AutoAttack accuracy on the full test set in the shape of
    RobustBench's model_info entries (RobustBench/robustbench, model_info/<dataset>/<Linf|L2>/<name>.json);
    returns the line that says what is left to fill in."""
    architecture = {"resnet18": "ResNet-18"}.get(meta["arch"], "WideResNet-" + "-".join(meta["arch"].split("-")[1:]))
    eps = runs.fmt_fraction(meta["epsilon"]) if meta["norm"] == "linf" else f"{meta['epsilon']:g}"
    info = {"link": "", "name": "", "authors": "", "additional_data": False, "number_forward_passes": 1,
            "dataset": meta["dataset"], "venue": "", "architecture": architecture, "eps": eps,
            "clean_acc": f"{100 * masks['clean'].double().mean().item():.2f}", "reported": "",
            "autoattack_acc": f"{100 * masks['aa'].double().mean().item():.2f}", "footnote": "", "unreliable": False}
    path = os.path.join(out_dir, "robustbench_model_info.json")
    runs.write_atomic(path, lambda f: json.dump(info, f, indent=4), "w")
    board = {"linf": "8/255", "l2": "0.5"}[meta["norm"]]
    return (f"wrote {path} for RobustBench's {NORMS[meta['norm']]} leaderboard: fill in "
            "link, name, authors, venue, reported (your paper's figure) and footnote; additional_data false (dynat.py "
            "trains on the training set alone)" + ("" if eps == board else f"; note: the leaderboard's eps is {board}, "
                                                   f"this evaluation's {eps}"))


# ----------------------------------------------------------------------------- main

def load_model(args, device, log):
    """The model to evaluate (eval mode, frozen, on the device) and its test images (uint8, on the CPU)."""
    state, arch, dataset, data_dir, classes, norm = resolve_checkpoint(args, log)
    sets = runs.checked(data.load_data, dataset, data_dir, args.workers)
    if classes is not None and classes != sets["classes"]:
        raise runs.UsageError(f"{args.checkpoint} has {classes} classes, {dataset} at {data_dir} "
                              f"has {sets['classes']}")
    try:
        model = models.build_model(arch, sets["classes"])
    except ValueError as e:
        raise runs.UsageError(f"--arch: {e}")
    runs.load_weights(model, state, f"{args.checkpoint} [{args.model}]", log)  # strict: exact keys and shapes
    bad = runs.first_nonfinite(model.state_dict())
    if bad:
        raise runs.UsageError(f"{args.checkpoint} [{args.model}]: {bad} holds inf or nan: nothing to evaluate")
    # Only input gradients are needed; frozen weights also keep FAB's backward from filling .grad.
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    model.eval().requires_grad_(False)
    x_test, y_test = sets["test"]
    if len(y_test) == 0:
        raise runs.UsageError(f"{dataset} at {data_dir}: no test images")
    # Sanity checks before attacking: eval mode everywhere (BatchNorm on running statistics) and the
    # threat model's pixel range (the models see unnormalised [0, 1] inputs).
    if any(m.training for m in model.modules()):
        raise runs.UsageError(f"{arch}: a submodule stays in train mode after model.eval()")
    probe = data.to_input(x_test[:args.batch_size], device)
    if x_test.dtype != torch.uint8 or probe.min() < 0 or probe.max() > 1:
        raise runs.UsageError(f"{dataset}: test inputs are not [0, 1] pixels (dtype {x_test.dtype})")
    return model, arch, dataset, sets["classes"], x_test, y_test, norm


def open_out_dir(args, meta, attacks, stack):
    """The output directory, held for `stack`'s life (runs.own_out_dir), and the attacks an interrupted
    evaluation finished there (with --resume); (out_dir, None, None) where it holds this very evaluation, finished.
    By default its name carries a digest of every setting: evaluations with other settings (attacks, n, epsilon,
    ..., other weights) never share a directory, and nothing is overwritten unasked."""
    named = {k: meta[k] for k in SETTINGS + ("attacks",) if k != "dry_run" or meta[k]}  # digests as before
    digest = hashlib.sha256(json.dumps(named, sort_keys=True).encode())
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                           f"eval_{stem}_{args.model}_{digest.hexdigest()[:8]}")
    results_path = os.path.join(out_dir, "results.json")
    done, seconds = {}, {}
    earlier = os.path.isfile(results_path) or glob.glob(os.path.join(out_dir, "autoattack_*.json"))
    prev = None
    if os.path.isfile(results_path):
        with open(results_path) as f:
            prev = json.load(f)
    setting = lambda key: prev.get(key, False if key == "dry_run" else None)  # results.json from before dry_run
    repeated = (prev is not None and prev.get("complete") and all(setting(k) == meta[k] for k in SETTINGS)
                and set(meta["attacks"]) <= set(prev["attacks"]))  # the same evaluation, finished: print it again
    if repeated and not args.overwrite:
        return out_dir, None, None
    resuming = prev is not None and args.resume  # --resume with nothing there: start it
    if resuming:
        for key in SETTINGS:
            if setting(key) != meta[key]:
                raise runs.UsageError(f"--resume: {out_dir} was evaluated with {key} = {prev.get(key)!r}, "
                                      f"not {meta[key]!r}; pass --out-dir elsewhere or --overwrite")
        with np.load(os.path.join(out_dir, "per_example.npz")) as f:
            done = {a: torch.from_numpy(f[a]) for a in attacks if a in f.files and a in prev["seconds"]}
        seconds = {a: prev["seconds"][a] for a in done}
    elif earlier and not (args.overwrite or args.resume):
        raise runs.UsageError(f"{out_dir} holds an earlier evaluation with the same settings: pass --resume "
                              "to continue it or --overwrite to start again")
    stack.enter_context(runs.own_out_dir(out_dir, "evaluate.py"))  # refused while a live evaluation writes there
    if not resuming:  # a stale AutoAttack state would otherwise be continued
        for path in glob.glob(os.path.join(out_dir, "autoattack_*.json")):
            os.remove(path)
    return out_dir, done, seconds


def attack(name, model, x, y, clean, args, out_dir, progress, amp, classes, **common):
    """One column: the robust flags of the n images under attack `name` (reseeded with --seed, so a
    column does not depend on which attacks ran before it or on a resume). PGD and C&W run in `amp`."""
    torch.manual_seed(args.seed)
    if name in AUTOATTACK:
        return autoattack(model, x, y, clean, name, norm=args.norm, epsilon=args.epsilon, seed=args.seed,
                          batch_size=args.batch_size, device=common["device"], classes=classes, progress=progress,
                          state_path=os.path.join(out_dir, f"autoattack_{name}.json"), dry_run=args.dry_run)
    loss, steps = re.fullmatch(r"(pgd|cw)(\d+)", name).groups()
    settings = dict(epsilon=args.epsilon, step_size=args.step_size, num_steps=1 if args.dry_run else int(steps),
                    loss="ce" if loss == "pgd" else "cw", start="uniform", norm=args.norm)
    with progress(0, column(name)) as bar, runs.autocast(common["device"], amp):
        return runs.robust_mask(model, x, y, dynat.pgd(**settings), clean=clean, restarts=args.restarts,
                                progress=bar, **common)


def provenance():
    """results.json's commit and library versions (runs.provenance plus pyautoattack's)."""
    versions = runs.provenance()
    return {"commit": versions.pop("commit"), "versions": {**versions, "pyautoattack": pyautoattack.__version__}}


def run(args, stack):
    log = lambda *a: print(*a, flush=True)
    runs.require(args, ("n", "restarts", "batch_size"), lambda v: v >= 1, ">= 1")
    runs.require(args, ("workers",), lambda v: v >= 0, ">= 0")
    if args.amp == "fp16":
        raise runs.UsageError("--amp fp16 is refused: fp16's input gradient underflows to 0 on confidently "
                              "classified points, PGD stops moving and robust accuracy is overstated; use bf16 or none")
    attacks = parse_attacks(args.attacks)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise runs.UsageError("evaluate.py runs in one process: start it with python, not torchrun")
    runs.configure_backends(deterministic=True, warn_only=True)
    _, _, device = runs.init_processes(args.device)
    amp = runs.amp_dtype(args.amp, device)
    model, arch, dataset, classes, x_test, y_test, trained_norm = load_model(args, device, log)
    # the threat model: the checkpoint's unless given; its radius and step by default
    args.norm = args.norm or trained_norm or "linf"
    dynat.resolve_threat_model(args)
    n = min(args.n or len(y_test), len(y_test))
    x, y = x_test[:n], y_test[:n]
    attack_precision = "bf16" if amp is not None else "float32"
    meta = {"checkpoint": os.path.abspath(args.checkpoint), "checkpoint_sha256": file_sha256(args.checkpoint),
            "model": args.model, "arch": arch, "dataset": dataset, "images_sha256": images_sha256(x, y),
            "classes": classes, "n": n, "n_test": len(y_test),
            "norm": args.norm, "epsilon": args.epsilon, "step_size": args.step_size, "restarts": args.restarts,
            "seed": args.seed,
            "amp": args.amp, "batch_size": args.batch_size, "attacks": ["clean"] + attacks, "device": str(device),
            "machine": runs.machine(device),
            "dry_run": args.dry_run,
            "precision": {a: "float32" if a == "clean" or a in AUTOATTACK else attack_precision
                          for a in ["clean"] + attacks},
            **provenance()}
    out_dir, done, seconds = open_out_dir(args, meta, attacks, stack)
    if done is None:  # asked again: printed again, nothing recomputed or rewritten
        with open(os.path.join(out_dir, "results.md")) as f:
            log(f"{out_dir} already holds this evaluation, finished (--overwrite recomputes it):\n\n{f.read()}")
        return 0
    log(f"evaluating {meta['checkpoint']} [{args.model}: {arch}] on {dataset}: first {n} of {len(y_test)} test "
        f"images, {NORMS[args.norm]} eps {runs.fmt_fraction(args.epsilon)}{pgd_settings(meta)}, seed {args.seed}, "
        f"{device}, precision "
        f"{', '.join(f'{column(a)} {p}' for a, p in meta['precision'].items())} -> {out_dir}")
    progress = lambda total, desc: runs.progress_bar(total, desc, unit="img")
    common = dict(device=device, batch_size=args.batch_size, channels_last=device.type == "cuda",
                  fixed_shape=device.type == "cuda")
    t0 = time.time()
    masks = {"clean": runs.classify(model, x, y, **common)[1]}  # float32, whatever --amp says
    seconds["clean"] = time.time() - t0
    clean_acc = masks["clean"].float().mean().item()
    log(f"clean accuracy: {100 * clean_acc:.2f}% ({int(masks['clean'].sum())}/{n})")
    if clean_acc <= 1.5 / classes and dataset != "synthetic":  # synthetic labels are random: chance is expected
        log(f"warning: clean accuracy is near chance ({classes} classes): wrong checkpoint, --model or --dataset?")
    for name in done:  # the attacks an interrupted run finished: in every results.json from now on
        masks[name] = done[name] & masks["clean"]
        log(f"{column(name)}: {100 * masks[name].float().mean().item():.2f}% (kept from the earlier evaluation)")
    save_outputs(out_dir, meta, masks, seconds, complete=False)
    for name in attacks:
        if name in done:
            continue
        # an AutoAttack resumed here: the seconds its interrupted processes spent count too
        earlier = (aa_state(os.path.join(out_dir, f"autoattack_{name}.json")) or {}).get("seconds", 0.0)
        t0 = time.time()
        masks[name] = attack(name, model, x, y, masks["clean"], args, out_dir, progress, amp=amp, classes=classes,
                             **common) & masks["clean"]
        seconds[name] = earlier + time.time() - t0
        log(f"{column(name)}: {100 * masks[name].float().mean().item():.2f}% ({seconds[name]:.1f} s"
            + (f", {earlier:.1f} of them before the resume)" if earlier else ")"))
        save_outputs(out_dir, meta, masks, seconds, complete=False)
    header, lines = save_outputs(out_dir, meta, masks, seconds, complete=True)
    log("\n" + header + "\n" + "\n".join(lines))
    log(f"wrote {out_dir}/results.md, results.json, per_example.npz")
    if "aa" in attacks and n == len(y_test) and dataset in ("cifar10", "cifar100"):
        log(robustbench_info(out_dir, meta, masks))
    return 0


def main(argv=None):
    def evaluate():
        with contextlib.ExitStack() as stack:
            return run(get_parser().parse_args(argv), stack)
    return runs.exit_code("evaluate.py", evaluate, stopped="; the finished attacks are saved: run again with --resume",
                          interrupted="interrupted; the finished attacks are saved: run again with --resume")


if __name__ == "__main__":
    sys.exit(main())
