"""tools/bench.py: how fast is one DYNAT training step, against what it must cost and against the release?

A DYNAT step needs K attack iterations (target forward + input gradient) and two model updates
(target and guide forward + backward). This script times, in one process, on synthetic data:

  ours     dynat.dynat_loss called exactly as dynat.py's training loop calls it (augment, loss,
           zero_grad, scaler.scale(loss).backward(), scaler.step, scaler.update, the step's one
           host read); with --compile also "ours ... +compile" rows (compiled copies of the models)
  floor    the pass-count floor: K x target forward+input-gradient + one target forward+backward
           + one guide forward+backward (+ the clean target forward of the release's BatchNorm
           statistics, --clean-bn, without --alpha; + AWP's target forward+weight-gradient with --awp;
           + the clean target forward of the KL attack without --inner; + the clean target pass of
           the TRADES term with --alpha > 0), each piece timed on its own with the same models and
           precision, eager
  literal  BASELINE: the release's compute pattern (guide re-run inside every attack step, a clean
           forward of the target, fp32, NCHW, eager), deliberately naive, one row per run

Times are medians over --steps rounds after --warmup rounds; each round runs every row and floor
piece once in turn, so all of them see the same machine (CUDA events on CUDA, time.perf_counter on
CPU). Peak memory (CUDA): torch.cuda.max_memory_allocated during one extra step of the row, minus
what was allocated before it (every model and optimizer alive in the process is in both); on CPU
only the process's peak RSS over all rows (getrusage ru_maxrss), in the header.
FLOPs: one real step of ours, eager, counted by FlopCount (torch.utils.flop_counter's formulas for
matmuls and convolutions, forward and backward), on every device. MFU = FLOPs / median step time /
peak, against two peaks: a matmul measured here in the row's precision (8192^2 on CUDA, 1024^2 on
a CPU), and on the GPUs of DATASHEET_TFLOPS the datasheet's dense peak. fp32 rows on a GPU of compute
capability 8.0 or newer run TF32 (dynat.py allows it) and are labelled so.

Quick start (CPU, a few minutes on 2 cores):
  python tools/bench.py --target wrn-16-4 --guide wrn-16-2 --batch-size 64 --inner --amp none,bf16 --steps 5 --warmup 2
Last measured: see README, "Performance" (hardware, torch version and the table).
"""
import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: dynat.py
import dynat  # noqa: E402
import dynat_runs as runs  # noqa: E402

with runs.ours("models", "data"):
    import data  # noqa: E402
    import models  # noqa: E402

PRECISIONS = ("none", "bf16", "fp16")
# Dense (no sparsity) datasheet peaks in TFLOP/s: (fp32, tf32, bf16, fp16), matched by substrings of
# torch.cuda.get_device_name in this order. Any other GPU gets MFU against the measured matmul only.
DATASHEET_TFLOPS = (
    ("H200", (67.0, 494.7, 989.4, 989.4)),
    ("H100 NVL", None),                     # not in the table: measured peak only
    ("H100 PCIe", (51.2, 378.0, 756.0, 756.0)),
    ("H100", (67.0, 494.7, 989.4, 989.4)),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", (19.5, 156.0, 312.0, 312.0)),
    ("L40S", (91.6, 183.0, 362.0, 362.0)),
    ("V100", (15.7, None, None, 125.0)),
)


def precision_list(text):
    """Parse --amp: one of none/bf16/fp16 or a comma list of them ('none,bf16')."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in PRECISIONS]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one or more of {', '.join(PRECISIONS)}, comma-separated")
    return list(dict.fromkeys(items))


def get_parser():
    """bench.py's flags; a setting it shares with dynat.py is that one's definition (Config's field, or
    dynat_runs.FLAGS's entry), with this benchmark's default where it differs."""
    p = argparse.ArgumentParser(description="Time DYNAT training steps against their pass-count floor and the release's pattern.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("the step timed (dynat.py's flags)")
    runs.add_flags(g, "target", "guide", "batch_size", "ema", "channels_last", "device",
                   target=dict(help="target model f_t (resnet18 or wrn-D-K); wrn-16-4 for a CPU run"),
                   guide=dict(help="guide model f_g (same choices); wrn-16-2 for a CPU run"),
                   batch_size=dict(help="batch size m"),
                   ema=dict(help="dynat.py's --ema: the step also moves the average of the target's weights"),
                   channels_last=dict(help="channels_last for our step and the floor"))
    cost = {"awp": " (one extra target pass)", "alpha": " (> 0: a clean target forward and backward more)"}
    for name in ("num_steps", "inner", "awp", "alpha", "clean_bn"):
        dynat.config_flag(g, name, help=dynat.config_help()[name] + cost.get(name, ""))
    g = p.add_argument_group("the benchmark")
    a = g.add_argument
    a("--amp", type=precision_list, default=["bf16"],
      help="autocast precision(s) of our step: none, bf16, fp16 or a comma list (none,bf16) timed in one run")
    a("--compile", action="store_true",
      help="also time compiled copies of the models (torch.compile) as '+compile' rows beside the eager ones")
    a("--steps", type=int, default=10, help="timed steps; the median is reported")
    a("--warmup", type=int, default=3, help="untimed steps before timing (cuDNN autotuning, compilation, allocator)")
    a("--json", action="store_true", help="print one JSON object instead of the table")
    return p


# ----------------------------------------------------------------------------- timing

def time_call(fn, device):
    """Seconds of one call of fn. CUDA: device time between two events around it (waiting for the end
    event keeps the next call from overlapping); CPU: wall time."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_round_robin(fns, device, steps, warmup):
    """{name: [seconds per call]}: `warmup` untimed rounds, then `steps` timed rounds, each round
    calling every fn once in turn. Interleaving makes the ratios between rows robust to a machine
    whose speed drifts (other processes, clocks): every row sees the same conditions."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return times


def peak_mib(fn, device):
    """Memory one call of fn adds at its peak, above what was allocated before it (so the models and
    optimizers of the other rows, alive in the process, do not count): CUDA; on a CPU None (the
    process's peak RSS is in the header)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def matmul_peak(device, dtype):
    """FLOP/s of a large square matmul in `dtype` (an MFU denominator), measured here. On a CPU 1024^2 with 3
    timed rounds: a CPU without bf16 units emulates a bf16 matmul about 50x slower than float32 (AMD EPYC Zen 3:
    1 vs 58 GFLOP/s), where 2048^2 would take a minute a round."""
    n, rounds = (8192, (10, 3)) if device.type == "cuda" else (1024, (3, 1))
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / statistics.median(time_round_robin({"mm": lambda: a @ b}, device, *rounds)["mm"])


def runs_tf32(device):
    """fp32 matmuls and convolutions of dynat.py run as TF32 here (it allows TF32; Ampere and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def datasheet_peak(device_name, precision):
    """(GPU row, dense TFLOP/s) of DATASHEET_TFLOPS for a precision of fp32/tf32/bf16/fp16, or None."""
    for name, peaks in DATASHEET_TFLOPS:
        if name in device_name:
            value = peaks and peaks[("fp32", "tf32", "bf16", "fp16").index(precision)]
            return (name, value) if value else None
    return None


class FlopCount(TorchDispatchMode):
    """FLOPs of the matmuls and convolutions run inside, forward and backward, by the formulas of
    torch.utils.flop_counter. (FlopCounterMode itself cannot count a DYNAT step: its module tracker
    raises "A leaf node was passed to _will_engine_execute_node" at the attack's torch.autograd.grad
    w.r.t. the leaf x_adv, PyTorch issue 131753. Same formulas, no module tracker.)"""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn):
    """FLOPs of one call of fn (eager)."""
    with FlopCount() as counter:
        fn()
    return counter.total


# ----------------------------------------------------------------------------- steps

def batch_fn(device, batch_size, channels_last):
    """Augmented batches of synthetic uint8 images, through the training loop's own data path."""
    images, labels = (t.to(device) for t in data.load_data("synthetic", None)["train"])

    def next_batch():
        idx = torch.randint(len(labels), (batch_size,), device=device)  # the loop's shuffled batch
        return data.train_batch(images, labels, idx, device, channels_last)
    return next_batch


def our_step_fn(target, guide, optimizer, scaler, next_batch, cfg, amp, ema=None):
    """One training step exactly as dynat.py's loop takes it: dynat.train_step and its one host read."""
    def step():
        x, y = next_batch()
        dynat.train_step(target, guide, optimizer, scaler, x, y, cfg, amp=amp, ema=ema).tolist()
    return step


def literal_step_fn(target, guide, next_batch, settings, lr=0.1):
    """BASELINE, deliberately naive: the released code's compute pattern, re-written only to be timed.
    Its costs over dynat_loss: the guide runs on the clean batch inside every attack step (train mode,
    graph built), the target's weights keep requires_grad during the attack, the target runs an extra
    clean forward (train mode) whose output is unused (with alpha = 0), AWP uses a proxy model copy,
    and everything is fp32, NCHW, eager. Own copies of the models so it never sees channels_last/compile."""
    target = copy.deepcopy(getattr(target, "_orig_mod", target)).to(memory_format=torch.contiguous_format)
    guide = copy.deepcopy(getattr(guide, "_orig_mod", guide)).to(memory_format=torch.contiguous_format)
    proxy = copy.deepcopy(target)
    optimizer = torch.optim.SGD([*target.parameters(), *guide.parameters()], lr=lr, momentum=0.9, weight_decay=2e-4)
    proxy_opt = torch.optim.SGD(proxy.parameters(), lr=0.01)
    eps, step_size, k, beta, alpha = settings.epsilon, settings.step_size, settings.num_steps, settings.beta, settings.alpha
    gamma = settings.awp_gamma if settings.awp else 0.0

    def step():
        x, y = next_batch()
        x = x.contiguous()
        target.eval()
        x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        if not settings.inner:
            with torch.no_grad():
                p_nat = F.softmax(target(x), dim=1)
        for _ in range(k):
            x_adv.requires_grad_(True)
            y_dyn = guide(x).argmax(1)  # the release re-runs the guide in every attack step
            logits = target(x_adv)
            obj = (F.cross_entropy(logits, y_dyn, reduction="sum") if settings.inner
                   else F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum"))
            grad, = torch.autograd.grad(obj, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp(0, 1)
        target.train()
        logits_guide = guide(x)
        y_dyn = logits_guide.argmax(1)
        deltas = []
        if gamma > 0:  # AWP through a proxy copy of the target
            proxy.load_state_dict(target.state_dict())
            proxy_opt.zero_grad()
            (-F.cross_entropy(proxy(x_adv), y_dyn)).backward()
            proxy_opt.step()
            with torch.no_grad():
                for (name, w), w_p in zip(target.named_parameters(), proxy.parameters()):
                    if w.ndim > 1:
                        d = w_p - w
                        deltas.append((w, gamma * w.norm() * d / (d.norm() + 1e-20)))
                        w.add_(deltas[-1][1])
        logits_adv = target(x_adv)
        logits_nat = target(x)  # the release's clean forward after the adversarial one (used only when alpha > 0)
        loss = F.cross_entropy(logits_guide, y) + beta * F.cross_entropy(logits_adv, y_dyn)
        if alpha > 0:
            loss = loss + alpha * F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1),
                                           reduction="batchmean")
        loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for w, v in deltas:
                w.sub_(v)
    return step


def floor_pieces(target, guide, next_batch, settings, amp, device, ema=None):
    """The passes the algorithm cannot do without, with the models and precision of our step, as
    {piece: (callable doing one pass, passes per step)}. Each callable sets the modes it needs and
    leaves both models in train mode with their weights requiring grad, as our step expects."""
    x, y = next_batch()
    x_adv = (x + settings.epsilon * torch.randn_like(x).sign()).clamp(0, 1)
    alpha, ctx = settings.alpha, lambda: runs.autocast(device, amp)

    @contextlib.contextmanager
    def attack_ctx():  # never fp16, as perturb
        with ctx(), dynat.no_fp16(device):
            yield
    pieces = {}

    def input_grad():  # one attack iterate: eval mode, weights frozen, gradient w.r.t. the input only
        target.eval().requires_grad_(False)
        xa = x_adv.detach().requires_grad_(True)
        with attack_ctx():
            logits = target(xa).float()
        torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xa)
        target.train().requires_grad_(True)
    pieces["target fwd+input-grad"] = (input_grad, settings.num_steps)

    if not settings.inner:
        def clean_forward():  # p(f_t(x)) of the KL attack
            target.eval()
            with torch.no_grad(), attack_ctx():
                target(x).float()
            target.train()
        pieces["target clean fwd (KL attack)"] = (clean_forward, 1)

    def target_loss():
        with ctx():
            logits_adv = target(x_adv).float()
            loss = F.cross_entropy(logits_adv, y)
            if alpha > 0:  # a clean branch of the TRADES term's cost
                loss = loss + F.mse_loss(target(x).float(), logits_adv.detach())
        return loss

    def target_fwd_bwd():
        target.zero_grad(set_to_none=True)
        target_loss().backward()
    pieces["target fwd+bwd" + (" (x' and x)" if alpha > 0 else "")] = (target_fwd_bwd, 1)

    if settings.clean_bn and alpha == 0:
        def clean_bn_forward():  # the release's BatchNorm statistics: f_t(x) in train mode, no graph
            with torch.no_grad(), ctx():
                target(x).float()
        pieces["target clean fwd (BN statistics)"] = (clean_bn_forward, 1)

    def guide_fwd_bwd():
        guide.zero_grad(set_to_none=True)
        with ctx():
            loss = F.cross_entropy(guide(x).float(), y)
        loss.backward()
    pieces["guide fwd+bwd"] = (guide_fwd_bwd, 1)

    if ema is not None:  # --ema: not a pass of the algorithm, the update that follows the step
        pieces["target EMA update"] = (lambda: runs.update_ema(ema[0], target, ema[1]), 1)

    if settings.awp:
        weights = [p for p in target.parameters() if p.ndim > 1]
        # AWP's ascent direction: the target's loss, gradient w.r.t. its conv/linear weights only.
        pieces["AWP target fwd+weight-grad"] = (lambda: torch.autograd.grad(target_loss(), weights), 1)
    return pieces


# ----------------------------------------------------------------------------- main

def build(args, device):
    """The models, and {(row, precision): step fn} plus each precision's floor pieces, all sharing the
    same initial weights; the literal baseline takes eager fp32 NCHW copies before anything else."""
    # dynat.py's defaults for everything not benchmarked (epsilon, step size, beta, AWP gamma, ...).
    dyn_args = dynat.get_parser().parse_args(["--target", args.target, "--guide", args.guide])
    dynat.validate_args(dyn_args)
    settings = dynat.Config(num_steps=args.num_steps, alpha=args.alpha, inner=args.inner, awp=args.awp,
                            clean_bn=args.clean_bn)
    torch.manual_seed(0)
    build = models.build_model
    target, guide = build(args.target, 10).to(device), build(args.guide, 10).to(device)
    fns = {("literal", "fp32"): literal_step_fn(target, guide, batch_fn(device, args.batch_size, False),
                                                settings, dyn_args.lr)}
    variants = [("", target, guide)]
    if args.compile:  # compiled copies beside the eager models: both rows in one run
        variants.append(("+compile", copy.deepcopy(target), copy.deepcopy(guide)))
    next_batch = batch_fn(device, args.batch_size, args.channels_last)
    pieces, amps = {}, {}
    for suffix, t, g in variants:
        for m in (t, g):
            m.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
            if suffix:
                m.compile()
        optimizer = torch.optim.SGD([*t.parameters(), *g.parameters()], lr=dyn_args.lr,
                                    momentum=dyn_args.momentum, weight_decay=dyn_args.weight_decay)
        ema = (copy.deepcopy(t).requires_grad_(False), args.ema) if args.ema else None
        for precision in args.amp:
            name = ("fp32" if precision == "none" else precision) + suffix
            amps[name] = runs.amp_dtype(precision, device)
            scaler = torch.amp.GradScaler(device.type, enabled=amps[name] == torch.float16)
            fns[("ours", name)] = our_step_fn(t, g, optimizer, scaler, next_batch, settings, amps[name], ema)
            if not suffix:
                pieces[name] = floor_pieces(t, g, next_batch, settings, amps[name], device, ema)
                fns.update({(name, piece): fn for piece, (fn, _) in pieces[name].items()})
    # FLOPs of one eager step, the same for every precision (counted on a copy: the timed models stay as they are).
    t, g = copy.deepcopy(target), copy.deepcopy(guide)
    sgd = torch.optim.SGD([*t.parameters(), *g.parameters()], lr=dyn_args.lr)
    flops = count_flops(our_step_fn(t, g, sgd, torch.amp.GradScaler(device.type, enabled=False), next_batch,
                                    settings, None))
    return fns, pieces, amps, flops


def row_of(kind, name, times, median, pieces, amps, flops, device, fns, batch_size):
    """One table row: time, throughput, memory; for ours the floor, the speed-up and the MFU."""
    t = median[(kind, name)]
    row = {"row": kind, "precision": name, "step_ms": 1e3 * t, "times_ms": [1e3 * s for s in times[(kind, name)]],
           "img_per_s": batch_size / t, "peak_mib": peak_mib(fns[(kind, name)], device)}
    if kind != "ours":
        return dict(row, kernels="tf32" if runs_tf32(device) else "fp32")  # the literal step is fp32 (TF32 where allowed)
    eager = name.split("+")[0]
    floor = sum(median[(eager, piece)] * n for piece, (_, n) in pieces[eager].items())
    row.update(speedup_vs_literal=median[("literal", "fp32")] / t, floor_ms=1e3 * floor, step_over_floor=t / floor,
               floor_pieces={piece: {"ms": 1e3 * median[(eager, piece)], "passes": n}
                             for piece, (_, n) in pieces[eager].items()})
    dtype = amps[name] or torch.float32
    kernel = {torch.float32: "tf32" if runs_tf32(device) else "fp32", torch.bfloat16: "bf16",
              torch.float16: "fp16"}[dtype]
    measured = matmul_peak(device, dtype)
    sheet = datasheet_peak(torch.cuda.get_device_name(device), kernel) if device.type == "cuda" else None
    row.update(kernels=kernel, flops_per_step=flops, matmul_peak_tflops=measured / 1e12, mfu_measured=flops / t / measured,
               datasheet_gpu=sheet and sheet[0], datasheet_peak_tflops=sheet and sheet[1],
               mfu_datasheet=sheet and flops / t / (sheet[1] * 1e12))
    return row


def run(args):
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise runs.UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_steps < 0 or args.warmup < 0 or args.alpha < 0 or not 0 <= args.ema < 1:
        raise runs.UsageError("--num-steps, --warmup and --alpha must be >= 0, --ema in [0, 1)")
    _, _, device = runs.init_processes(args.device)
    runs.configure_backends(deterministic=False)  # as dynat.py: cuDNN autotuning, TF32 for fp32
    fns, pieces, amps, flops = build(args, device)
    load_before = os.getloadavg()[0]
    times = time_round_robin(fns, device, args.steps, args.warmup)
    load_after = os.getloadavg()[0]
    median = {key: statistics.median(t) for key, t in times.items()}
    rows = [row_of(kind, name, times, median, pieces, amps, flops, device, fns, args.batch_size)
            for kind, name in fns if kind in ("literal", "ours")]
    cuda = device.type == "cuda"
    return {"config": {"target": args.target, "guide": args.guide, "batch_size": args.batch_size,
                       "num_steps": args.num_steps, "inner": args.inner, "awp": args.awp, "alpha": args.alpha,
                       "clean_bn": args.clean_bn, "ema": args.ema, "channels_last": args.channels_last,
                       "compile": args.compile,
                       "steps": args.steps, "warmup": args.warmup},
            "env": {"device": str(device), **runs.provenance(),
                    "device_name": runs.machine(device),
                    "timer": "cuda events" if cuda else "time.perf_counter",
                    "peak_memory": "torch.cuda.max_memory_allocated of one step above what was allocated before it" if cuda
                    else f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
                    "(getrusage ru_maxrss, all rows together)",
                    "flops": "FlopCount over one real eager step (torch.utils.flop_counter's formulas)",
                    "datasheet_gpus": [name for name, peaks in DATASHEET_TFLOPS if peaks],
                    "load_average": [load_before, load_after]},
            "rows": rows}


def print_table(result):
    c, e = result["config"], result["env"]
    variant = ("inner CE attack" if c["inner"] else "KL attack") + (", AWP" if c["awp"] else "") + f", alpha {c['alpha']:g}"
    print(f"DYNAT step: target {c['target']}, guide {c['guide']}, batch {c['batch_size']}, K={c['num_steps']}, {variant}, "
          f"clean_bn {c['clean_bn']}, channels_last {c['channels_last']}")
    print(f"{e['device_name']} ({e['device']}), torch {e['torch']}, commit {e['commit']}; median of {c['steps']} "
          f"interleaved steps after {c['warmup']} warm-up ({e['timer']}); load average {e['load_average'][0]:.1f} -> "
          f"{e['load_average'][1]:.1f}")
    print(f"peak memory: {e['peak_memory']}")
    cuda = e["device"].startswith("cuda")
    print(f"{'step':<22}{'ms/step':>10}{'img/s':>9}{'floor ms':>10}{'step/floor':>11}{'speed-up':>10}{'MFU':>8}"
          + (f"{'sheet MFU':>10}{'peak MiB':>10}" if cuda else ""))
    for r in result["rows"]:
        label = f"{r['row']} {r['precision']}" + (f" ({r['kernels']})" if r.get("kernels") == "tf32" else "")
        line = f"{label:<22}{r['step_ms']:>10.1f}{r['img_per_s']:>9.1f}"
        if r["row"] == "literal":
            line += f"{'-':>10}{'-':>11}{'1.00x':>10}{'-':>8}"
        else:
            line += (f"{r['floor_ms']:>10.1f}{r['step_over_floor']:>11.2f}{r['speedup_vs_literal']:>9.2f}x"
                     f"{r['mfu_measured']:>8.1%}")
        if cuda:
            sheet = r.get("mfu_datasheet")
            line += (f"{sheet:>10.1%}" if sheet else f"{'-':>10}") + f"{r['peak_mib']:>10.0f}"
        print(line)
    print("speed-up: literal fp32 step / this step; +compile rows are compared with the eager floor. "
          "floor pieces (median ms per pass x passes per step):")
    for r in result["rows"]:
        if "floor_pieces" in r and "+" not in r["precision"]:
            print(f"  {r['precision']:<5} " + " | ".join(f"{k} {v['ms']:.1f} x{v['passes']}" for k, v in r["floor_pieces"].items()))
    ours = [r for r in result["rows"] if r["row"] == "ours"]
    print(f"FLOPs per step {ours[0]['flops_per_step'] / 1e9:.1f} G ({e['flops']}). MFU: FLOPs / median step time / a "
          "matmul measured here in the row's precision (" +
          ", ".join(f"{r['precision']} {r['matmul_peak_tflops']:.2f} TFLOP/s" for r in ours) + ")" +
          ("; sheet MFU: against the dense datasheet peak (" + ", ".join(
              f"{r['precision']} {r['datasheet_gpu']} {r['datasheet_peak_tflops']:g}" for r in ours if r.get("datasheet_gpu"))
           + f"); GPUs with a datasheet peak here: {', '.join(e['datasheet_gpus'])}" if cuda else ""))


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        result = run(args)
    except runs.UsageError as e:
        print(f"tools/bench.py: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
