"""Data benchmark, the pair tasks (issue #15): seconds from start to the first optimizer step and peak RSS at
1k, 10k and 100k items for reflow pairs and depth pairs, measured as bench/bench_data.py measures the t2i rows
(a fresh train.py process per row, stopped at its first optimizer step; Linux VmHWM of the trainer and of its
DataLoader workers). Not a test.

    nice python bench/bench_data_pairs.py make        # the synthetic items, once, into /tmp/bench_data
    nice python bench/bench_data_pairs.py startup     # every row (--task reflow / depth: only its rows)

Items are small and synthetic, so the numbers are the data path's fixed and per-item costs:
- reflow: a pairs folder made for the demo teacher (assets/demo/d2f_tiny, 32 px: 4x8x8 latents), pairs.json
  with the spec train.py computes, shards of 64 random (noise, latent) pairs: train.py finds every shard made
  and trains on them (--n-pairs n, LoRA 16, batch 8).
- depth: a pair folder of n random 16x16 rgb/NNNNNNN.png + 16-bit depth/NNNNNNN.png, streamed (--no-cache, the
  SD preset's path: read and VAE-encoded per micro-batch; 2 workers), the tiny prior at 16 px, batch 8; and the
  same pairs as tar shards of 250 (KEY.rgb.png + KEY.depth.png).
"""
import argparse
import io
import json
import os
import sys
import tarfile
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import reflow  # noqa: E402
import sd  # noqa: E402
from bench_data import run_child  # noqa: E402 (the same child process and measures)

PRIOR = os.path.join(ROOT, "assets", "demo", "prior_tiny.safetensors")
COMMON = ["--batch-size", "8", "--sample-every", "0", "--save-every", "0", "--steps", "1"]
REFLOW = ["--task", "reflow", "--ckpt", reflow.DEMO_TEACHER, "--resolution", "32", "--lora", "16", *COMMON]
DEPTH = ["--task", "depth", "--ckpt", PRIOR, "--resolution", "16", "--no-cache", "--workers", "2", *COMMON]


def make_pairs(folder, n):
    """n reflow pairs as generate_pairs leaves them for the demo teacher: pairs.json (the spec train.py computes
    from the same teacher, prompts and settings) and n / 64 shards of random fp32 (noise, latent, prompts)."""
    os.makedirs(folder, exist_ok=True)
    prompts = os.path.join(folder, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("".join(f"a synthetic prompt number {i}\n" for i in range(1000)))
    bundle = sd.load(reflow.DEMO_TEACHER)
    spec, lines = reflow.pair_spec(bundle, reflow.DEMO_TEACHER, prompts, 40, None, 0, reflow.SHARD_SIZE, 32)
    pairs = os.path.join(folder, "pairs")
    reflow.check_manifest(pairs, spec)
    g, S = torch.Generator().manual_seed(0), spec.shard_size
    for i in range(reflow.n_shards(n, S)):
        noise, latent = torch.randn((2, S, 4, 8, 8), generator=g)
        save_file({"noise": noise, "latent": latent}, reflow.shard_path(pairs, i),
                  metadata={"prompts": json.dumps([lines[j % len(lines)] for j in range(i * S, (i + 1) * S)])})


def make_depth(folder, n):
    """n random pairs: rgb/NNNNNNN.png (16x16 RGB) + depth/NNNNNNN.png (16-bit millimetres)."""
    rng = np.random.default_rng(0)
    for sub in ("rgb", "depth"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(f"{folder}/rgb/{i:07d}.png")
        Image.fromarray(rng.integers(500, 9000, (16, 16)).astype(np.uint16)).save(f"{folder}/depth/{i:07d}.png")


def make_depth_shards(folder, n, per_shard=250):
    """make_depth's pairs as tar shards of per_shard KEY.rgb.png + KEY.depth.png (depth.DEPTH_SHARDS)."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for s in range(-(-n // per_shard)):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                for suffix, a in (("rgb.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
                                  ("depth.png", rng.integers(500, 9000, (16, 16)).astype(np.uint16))):
                    buf = io.BytesIO()
                    Image.fromarray(a).save(buf, "PNG")
                    info = tarfile.TarInfo(f"{i:07d}.{suffix}")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)


def reflow_args(folder, n):
    return [*REFLOW, "--prompts", os.path.join(folder, "prompts.txt"), "--pairs", os.path.join(folder, "pairs"),
            "--n-pairs", str(n)]


FORMATS = {  # (task, format) -> (make(folder, n), train.py arguments for (folder, n)), as bench_data.py's
    ("reflow", "pairs"): (make_pairs, reflow_args),
    ("depth", "pairs"): (make_depth, lambda folder, n: [*DEPTH, "--data", folder]),
    ("depth", "shards"): (make_depth_shards, lambda folder, n: [*DEPTH, "--data", folder]),
}

def data_folder(root, task, fmt, n):
    return os.path.join(root, f"{task}-{fmt}-{n}")


def make(args):
    for (task, fmt), (write, _) in FORMATS.items():
        for n in args.n:
            folder = data_folder(args.root, task, fmt, n)
            if args.task in (None, task):
                t = time.time()
                common.written_once(folder, lambda p: write(p, n))
                print(f"{folder}: ready ({time.time() - t:.0f} s)", flush=True)


def startup_row(args, task, fmt, n):
    out = os.path.join(args.root, "runs", f"{task}-{fmt}-{n}-{time.time_ns()}")
    argv = [*FORMATS[(task, fmt)][1](data_folder(args.root, task, fmt, n), n), "--out", out]
    return run_child(ROOT, argv, f"{task} {fmt} {n}")


def startup(args):
    print("| task | format | items | start-up to the first step (s) | peak RSS, trainer (MB) | peak RSS, workers "
          "(MB) |\n|---|---|---:|---:|---:|---:|", flush=True)
    for task, fmt in FORMATS:
        if args.task not in (None, task):
            continue
        for n in args.n:
            rows = [startup_row(args, task, fmt, n) for _ in range(args.repeat)]
            best = min(rows)  # the least disturbed run (a shared machine)
            print(f"| {task} | {fmt} | {n} | {best[0]:.2f} | {best[1]:.0f} | {best[2]:.0f} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["make", "startup"])
    p.add_argument("--root", default="/tmp/bench_data", help="where the synthetic items and runs go")
    p.add_argument("--n", type=int, nargs="+", default=[1000, 10000, 100000], help="items per row")
    p.add_argument("--task", choices=["reflow", "depth"], help="only this task's rows")
    p.add_argument("--repeat", type=int, default=2, help="runs per row; the fastest is reported")
    args = p.parse_args(argv)
    {"make": make, "startup": startup}[args.what](args)


if __name__ == "__main__":
    main()
