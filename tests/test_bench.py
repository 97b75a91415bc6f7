"""bench.py is a script, not a test: this checks that its device-agnostic paths run end to end on the CPU (the
GPU rows are the same code with --device cuda), and that the flops benchmark counts the whole UNet."""
import os
import re
import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from unet import PRESETS, UNet

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def unet_flops(size):
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        UNet(PRESETS["sd15"])(torch.empty(1, 4, size, size), torch.empty(1), torch.empty(1, 77, 768))
    return counter.get_total_flops()


def test_flops_benchmark_runs_and_counts_the_whole_unet():
    # SD1.5's UNet on a 64x64 latent (512 px) is ~0.8 TFLOP (multiply-add = 2 FLOPs): convolutions, linears
    # and attention are all counted
    assert 0.75e12 < unet_flops(64) < 0.85e12
    out = subprocess.run([sys.executable, os.path.join("bench", "bench.py"), "--only", "flops", "--unets", "sd15", "--flops-batch", "1",
                          "--flops-size", "8", "--matmul-size", "256", "--repeat", "1", "--warmup", "0",
                          "--threads", "1"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("unet sd15 fwd 1x4x8x8 bf16"))
    gflop, ours, ref, ratio = re.search(r"\(([\d.]+) GFLOP\).*?([\d.]+)\s+([\d.]+)\s+TFLOP/s\s+([\d.]+)$",
                                        row).groups()
    assert abs(float(gflop) - unet_flops(8) / 1e9) < 0.1
    assert float(ours) > 0 and float(ref) > 0 and abs(float(ratio) / (float(ours) / float(ref)) - 1) < 0.01
