"""tools/bench.py's counting (never its timings: speed is measured by running bench.py, not in a test).

The FLOPs of one real DYNAT step must equal the pass-count arithmetic: K attack iterates of the target
(forward + input gradient: 2 forward FLOPs), one target forward+backward (3; the first convolution
skips its input gradient, hence a small tolerance), the guide's forward+backward (3), and per variant
the KL attack's clean forward (1), the release's clean BatchNorm forward (1), AWP's weight-gradient
pass (3) or the TRADES clean branch (3).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import dynat

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import bench  # noqa: E402
import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 3
TOLERANCE = 0.01  # the first convolution's skipped input gradient is ~0.1 % of a wrn-16-2 step


@pytest.mark.parametrize("kw,target_passes", [
    (dict(inner=True, clean_bn=False), 2 * K + 3),
    (dict(inner=True), 2 * K + 3 + 1),
    (dict(), 2 * K + 3 + 1 + 1),
    (dict(inner=True, awp=True), 2 * K + 3 + 1 + 3),
    (dict(inner=True, alpha=1.0), 2 * K + 3 + 3),
], ids=["inner-no-clean-bn", "inner", "kl-attack", "inner-awp", "inner-alpha"])
def test_counted_flops_of_a_step_equal_the_pass_count(kw, target_passes):
    torch.manual_seed(0)
    target, guide = models.build_model("wrn-16-2", 10), models.build_model("wrn-10-1", 10)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    f_target = bench.count_flops(lambda: target(x))
    f_guide = bench.count_flops(lambda: guide(x))
    assert f_target > 0 and f_guide > 0

    def step():
        loss, _ = dynat.training_loss(target, guide, x, y, dynat.Config(num_steps=K, **kw))
        loss.backward()
    counted = bench.count_flops(step)
    expected = target_passes * f_target + 3 * f_guide
    assert counted == pytest.approx(expected, rel=TOLERANCE)


def test_bench_json_on_cpu_reports_flops_and_mfu_for_our_rows():
    proc = subprocess.run([sys.executable, "tools/bench.py", "--target", "wrn-10-1", "--guide", "wrn-10-1", "--batch-size", "8",
                           "--num-steps", "1", "--amp", "none,bf16", "--steps", "1", "--warmup", "0", "--inner", "--awp",
                           "--ema", "0.99", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {(r["row"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {("literal", "fp32"), ("ours", "fp32"), ("ours", "bf16")}
    for name in ("fp32", "bf16"):
        r = rows[("ours", name)]
        assert r["flops_per_step"] > 0 and 0 < r["mfu_measured"] and r["kernels"] == name
        assert r["datasheet_peak_tflops"] is None  # a CPU: no datasheet
        pieces = r["floor_pieces"]
        assert pieces["target fwd+input-grad"]["passes"] == 1 and "target clean fwd (BN statistics)" in pieces
        assert "AWP target fwd+weight-grad" in pieces and pieces["target EMA update"]["passes"] == 1
    assert result["env"]["commit"] and result["env"]["torch"] == str(torch.__version__)


@pytest.mark.parametrize("name,precision,peak", [("NVIDIA H100 80GB HBM3", "bf16", 989.4),
                                                 ("NVIDIA H100 PCIe", "tf32", 378.0),
                                                 ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
                                                 ("Tesla V100-SXM2-16GB", "bf16", None),
                                                 ("NVIDIA H100 NVL", "bf16", None),
                                                 ("NVIDIA GeForce RTX 4090", "bf16", None)])
def test_datasheet_peaks(name, precision, peak):
    found = bench.datasheet_peak(name, precision)
    assert (found and found[1]) == peak
