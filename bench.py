"""bench.py: how fast is one DYNAT training step, against what it must cost and against the release?

A DYNAT step needs K attack iterations (target forward + input gradient) and two model updates
(target and guide forward + backward). This script times, in one process, on synthetic data:

  ours     dynat.dynat_loss called exactly as dynat.py's training loop calls it (augment, loss,
           zero_grad, scaler.scale(loss).backward(), scaler.step, scaler.update)
  floor    the pass-count floor: K x target forward+input-gradient + one target forward+backward
           + one guide forward+backward (+ AWP's target forward+weight-gradient with --awp; + the
           clean target forward of the KL attack without --inner; + the clean target pass of the
           TRADES term with --alpha > 0), each piece timed on its own with the same models and precision
  literal  BASELINE: the release's compute pattern (guide re-run inside every attack step, an unused
           clean forward of the target, fp32, NCHW, eager), deliberately naive, one row per run

Times are medians over --steps rounds after --warmup rounds; each round runs every row and floor
piece once in turn, so all of them see the same machine (CUDA events on CUDA, time.perf_counter on
CPU). Peak memory: torch.cuda.max_memory_allocated of one extra step per row on CUDA; on CPU only
the process's peak RSS over all rows (resource.getrusage ru_maxrss), in the header.
MFU (CUDA only): FLOPs of one real step counted by torch.utils.flop_counter.FlopCounterMode
(convolutions and matmuls as executed, forward and backward; counted once, eager, before
--compile) / median step time / a matmul peak measured here (an 8192^2 matmul in the row's
precision; fp32 rows use TF32, which dynat.py allows).

Quick start (CPU, a few minutes on 2 cores):
  python bench.py --target wrn-16-4 --guide wrn-16-2 --batch-size 64 --inner --amp none,bf16 --steps 5 --warmup 2
Last measured (that command, channels_last on as by default; 2 vCPU AMD EPYC family 26 "Zen 5",
avx512_bf16, no AMX; torch 2.14.1+cu130; load average 0.8-1.8):
  literal fp32 5081 ms | ours fp32 3485 ms (0.69x literal, 1.01x floor) | ours bf16 1908 ms (0.38x, 0.97x)
"""
import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dynat
from models import ARCH_HELP

PRECISIONS = ("none", "bf16", "fp16")


def precision_list(text):
    """Parse --amp: one of none/bf16/fp16 or a comma list of them ('none,bf16')."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in PRECISIONS]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one or more of {', '.join(PRECISIONS)}, comma-separated")
    return list(dict.fromkeys(items))


def get_parser():
    p = argparse.ArgumentParser(description="Time DYNAT training steps against their pass-count floor and the release's pattern.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--target", default="wrn-34-10", help=f"target model f_t ({ARCH_HELP}); wrn-16-4 for a CPU run")
    a("--guide", default="resnet18", help="guide model f_g (same choices); wrn-16-2 for a CPU run")
    a("--batch-size", type=int, default=128, help="batch size m")
    a("--num-steps", type=int, default=10, help="attack steps K")
    a("--inner", action="store_true", help="DYNAT's CE attack on the dynamic labels (Eq. 7) instead of the KL attack")
    a("--awp", action="store_true", help="adversarial weight perturbation on the target (one extra target pass)")
    a("--alpha", type=float, default=0.0, help="TRADES weight alpha (> 0 adds a clean target forward+backward)")
    a("--amp", type=precision_list, default=["bf16"],
      help="autocast precision(s) of our step: none, bf16, fp16 or a comma list (none,bf16) timed in one run")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=True,
      help="channels_last for our step and the floor (dynat.py's default)")
    a("--compile", action="store_true", help="torch.compile both models (our step and the floor; the literal baseline stays eager)")
    a("--steps", type=int, default=10, help="timed steps; the median is reported")
    a("--warmup", type=int, default=3, help="untimed steps before timing (cuDNN autotuning, compilation, allocator)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
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
    """Peak memory of one call of fn: CUDA max_memory_allocated; CPU None (see the process's peak RSS)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def matmul_peak(device, dtype):
    """FLOP/s of a large square matmul in `dtype` (the MFU denominator), measured here."""
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / statistics.median(time_round_robin({"mm": lambda: a @ b}, device, 10, 3)["mm"])


# ----------------------------------------------------------------------------- steps

def batch_fn(device, batch_size, channels_last):
    """Augmented batches of synthetic uint8 images, through the training loop's own data path."""
    x_train, y_train = dynat.load_data("synthetic", None)["train"]
    x_train, y_train = x_train.to(device), y_train.to(device)

    def next_batch():
        idx = torch.randint(len(y_train), (batch_size,), device=device)  # the loop's shuffled batch
        return dynat.train_batch(x_train, y_train, idx, device, channels_last)
    return next_batch


def our_step_fn(target, guide, optimizer, scaler, next_batch, settings, amp):
    """One training step exactly as dynat.run() does it (no algorithm here)."""
    def step():
        x, y = next_batch()
        loss, stats = dynat.dynat_loss(target, guide, x, y, **settings, amp=amp, loss_scale=scaler.scale)
        # run() reads the losses back every step (finiteness check, progress bar): that host sync is kept.
        torch.stack([stats["loss_guide"].float(), stats["loss_target"].float()]).tolist()
        dynat.optimizer_step(loss, optimizer, scaler, [m for m in (target, guide) if m is not None])
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
    eps, step_size, k = settings["epsilon"], settings["step_size"], settings["num_steps"]
    beta, alpha, gamma = settings["beta"], settings["alpha"], settings["awp_gamma"]

    def step():
        x, y = next_batch()
        x = x.contiguous()
        target.eval()
        x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        if not settings["inner"]:
            with torch.no_grad():
                p_nat = F.softmax(target(x), dim=1)
        for _ in range(k):
            x_adv.requires_grad_(True)
            y_dyn = guide(x).argmax(1)  # the release re-runs the guide in every attack step
            logits = target(x_adv)
            obj = (F.cross_entropy(logits, y_dyn, reduction="sum") if settings["inner"]
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
        logits_nat = target(x)  # the release's clean forward (used only when alpha > 0)
        logits_adv = target(x_adv)
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


def floor_pieces(target, guide, next_batch, settings, amp, device):
    """The passes the algorithm cannot do without, with the models and precision of our step, as
    {piece: (callable doing one pass, passes per step)}. Each callable sets the modes it needs and
    leaves both models in train mode with their weights requiring grad, as our step expects."""
    x, y = next_batch()
    x_adv = (x + settings["epsilon"] * torch.randn_like(x).sign()).clamp(0, 1)
    alpha, ctx = settings["alpha"], lambda: dynat.autocast(device, amp)
    pieces = {}

    def input_grad():  # one attack iterate: eval mode, weights frozen, gradient w.r.t. the input only
        target.eval().requires_grad_(False)
        xa = x_adv.detach().requires_grad_(True)
        with ctx():
            logits = target(xa).float()
        torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xa)
        target.train().requires_grad_(True)
    pieces["target fwd+input-grad"] = (input_grad, settings["num_steps"])

    if not settings["inner"]:
        def clean_forward():  # p(f_t(x)) of the KL attack
            target.eval()
            with torch.no_grad(), ctx():
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

    def guide_fwd_bwd():
        guide.zero_grad(set_to_none=True)
        with ctx():
            loss = F.cross_entropy(guide(x).float(), y)
        loss.backward()
    pieces["guide fwd+bwd"] = (guide_fwd_bwd, 1)

    if settings["awp_gamma"] > 0:
        weights = [p for p in target.parameters() if p.ndim > 1]
        # AWP's ascent direction: the target's loss, gradient w.r.t. its conv/linear weights only.
        pieces["AWP target fwd+weight-grad"] = (lambda: torch.autograd.grad(target_loss(), weights), 1)
    return pieces


# ----------------------------------------------------------------------------- main

def run(args):
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise dynat.UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_steps < 0 or args.warmup < 0 or args.alpha < 0:
        raise dynat.UsageError("--num-steps, --warmup and --alpha must be >= 0")
    _, _, device = dynat.init_processes(args.device)
    # As dynat.run(): fixed shapes let cuDNN autotune; TF32 for the fp32 matmuls/convs.
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    channels_last = args.channels_last

    # dynat.py's defaults for everything not benchmarked (epsilon, step size, beta, AWP gamma, ...).
    dyn_args = dynat.get_parser().parse_args(["--target", args.target, "--guide", args.guide,
                                              "--num-steps", str(args.num_steps), "--alpha", str(args.alpha)]
                                             + ["--inner"] * args.inner + ["--awp"] * args.awp)
    dynat.validate_args(dyn_args)
    settings = dynat.loss_settings(dyn_args, epoch=dyn_args.awp_warmup if args.awp else 1)  # AWP on if asked

    torch.manual_seed(0)
    target = dynat.build_model(args.target, 10).to(device)
    guide = dynat.build_model(args.guide, 10).to(device)
    # The baseline takes eager fp32 NCHW copies before our models are converted or compiled.
    fns = {("literal", "fp32"): literal_step_fn(target, guide, batch_fn(device, args.batch_size, False),
                                                settings, dyn_args.lr)}
    for m in (target, guide):
        m.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD([*target.parameters(), *guide.parameters()], lr=dyn_args.lr,
                                momentum=dyn_args.momentum, weight_decay=dyn_args.weight_decay)
    next_batch = batch_fn(device, args.batch_size, channels_last)
    flops = None
    if device.type == "cuda":  # counted before compiling: a compiled graph hides its ops from the counter
        with FlopCounterMode(display=False) as counter:
            our_step_fn(target, guide, optimizer, torch.amp.GradScaler(device.type, enabled=False), next_batch,
                        settings, dynat.amp_dtype(args.amp[0], device))()
        flops = counter.get_total_flops()  # the same for every precision
    if args.compile:
        for m in (target, guide):
            m.compile()
    amps, pieces = {}, {}
    for precision in args.amp:
        name = "fp32" if precision == "none" else precision
        amps[name] = dynat.amp_dtype(precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amps[name] == torch.float16)
        fns[("ours", name)] = our_step_fn(target, guide, optimizer, scaler, next_batch, settings, amps[name])
        pieces[name] = floor_pieces(target, guide, next_batch, settings, amps[name], device)
        fns.update({(name, piece): fn for piece, (fn, _) in pieces[name].items()})

    load_before = os.getloadavg()[0]
    times = time_round_robin(fns, device, args.steps, args.warmup)
    load_after = os.getloadavg()[0]
    median = {key: statistics.median(t) for key, t in times.items()}
    literal = median[("literal", "fp32")]
    rows = []
    for (kind, name), fn in fns.items():
        if kind not in ("literal", "ours"):
            continue
        t = median[(kind, name)]
        row = {"row": kind, "precision": name, "step_ms": 1e3 * t, "times_ms": [1e3 * s for s in times[(kind, name)]],
               "img_per_s": args.batch_size / t, "peak_mib": peak_mib(fn, device)}
        if kind == "ours":
            floor = sum(median[(name, piece)] * n for piece, (_, n) in pieces[name].items())
            row.update(speedup_vs_literal=literal / t, floor_ms=1e3 * floor, step_over_floor=t / floor,
                       floor_pieces={piece: {"ms": 1e3 * median[(name, piece)], "passes": n}
                                     for piece, (_, n) in pieces[name].items()})
            if flops is not None:
                peak = matmul_peak(device, amps[name] or torch.float32)
                row.update(flops_per_step=flops, matmul_peak_tflops=peak / 1e12, mfu=flops / t / peak)
        rows.append(row)

    cuda = device.type == "cuda"
    return {"config": {"target": args.target, "guide": args.guide, "batch_size": args.batch_size,
                       "num_steps": args.num_steps, "inner": args.inner, "awp": args.awp, "alpha": args.alpha,
                       "channels_last": channels_last, "compile": args.compile, "steps": args.steps,
                       "warmup": args.warmup},
            "env": {"device": str(device), "torch": torch.__version__,
                    "device_name": torch.cuda.get_device_name(device) if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads",
                    "timer": "cuda events" if cuda else "time.perf_counter",
                    "peak_memory": "torch.cuda.max_memory_allocated of one step" if cuda else
                    f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
                    "(getrusage ru_maxrss, all rows together)",
                    "mfu_flops": "FlopCounterMode over one real step" if cuda else None,
                    "load_average": [load_before, load_after]},
            "rows": rows}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "CPU"


def print_table(result):
    c, e = result["config"], result["env"]
    variant = ("inner CE attack" if c["inner"] else "KL attack") + (", AWP" if c["awp"] else "") + f", alpha {c['alpha']:g}"
    print(f"DYNAT step: target {c['target']}, guide {c['guide']}, batch {c['batch_size']}, K={c['num_steps']}, {variant}, "
          f"channels_last {c['channels_last']}, compile {c['compile']}")
    print(f"{e['device_name']} ({e['device']}), torch {e['torch']}; median of {c['steps']} interleaved steps after "
          f"{c['warmup']} warm-up ({e['timer']}); load average {e['load_average'][0]:.1f} -> {e['load_average'][1]:.1f}")
    print(f"peak memory: {e['peak_memory']}")
    cuda = e["mfu_flops"] is not None
    print(f"{'step':<14}{'ms/step':>10}{'img/s':>9}{'floor ms':>10}{'step/floor':>11}{'speed-up':>10}"
          + (f"{'peak MiB':>10}{'MFU':>7}" if cuda else ""))
    for r in result["rows"]:
        line = f"{r['row'] + ' ' + r['precision']:<14}{r['step_ms']:>10.1f}{r['img_per_s']:>9.1f}"
        if r["row"] == "literal":
            line += f"{'-':>10}{'-':>11}{'1.00x':>10}"
        else:
            line += f"{r['floor_ms']:>10.1f}{r['step_over_floor']:>11.2f}{r['speedup_vs_literal']:>9.2f}x"
        if cuda:
            line += f"{r['peak_mib']:>10.0f}" + (f"{r['mfu']:>7.1%}" if "mfu" in r else f"{'-':>7}")
        print(line)
    print("speed-up: literal fp32 step / this step. floor pieces (median ms per pass x passes per step):")
    for r in result["rows"]:
        if "floor_pieces" in r:
            print(f"  {r['precision']:<5} " + " | ".join(f"{k} {v['ms']:.1f} x{v['passes']}" for k, v in r["floor_pieces"].items()))
    if cuda:
        print("MFU: FLOPs of one real step (torch.utils.flop_counter.FlopCounterMode) / median step time / a measured "
              "8192^2 matmul's FLOP/s in the row's precision (" +
              ", ".join(f"{r['precision']} {r['matmul_peak_tflops']:.0f} TFLOP/s" for r in result["rows"] if "mfu" in r) + ")")


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        result = run(args)
    except dynat.UsageError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
