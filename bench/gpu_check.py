"""Helpers of bench/gpu_check.sh (the one prepared GPU check): the tiny run's inputs and its log's verdict.

    python bench/gpu_check.py tiny DIR            # DIR/tiny.safetensors (sd.create, v-prediction) + 8 captioned images
    python bench/gpu_check.py log RUN_DIR STEPS   # RUN_DIR/log.jsonl holds steps 1..STEPS, each loss finite
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules
import sd  # noqa: E402


def tiny(folder):
    """What tests/test_train.py trains on: a fresh tiny bundle and random 40x48 images with .txt captions."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    sd.save(sd.create(), os.path.join(folder, "tiny.safetensors"))
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(os.path.join(folder, f"img{i}.png"))
        with open(os.path.join(folder, f"img{i}.txt"), "w") as f:
            f.write(f"a picture number {i}")
    print(f"wrote {folder}/tiny.safetensors and 8 images")


def check_log(run, steps):
    """Exit 1 unless log.jsonl has steps 1..steps (a resumed run appends to it) with finite losses."""
    with open(os.path.join(run, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    got = [r["step"] for r in rows]
    bad = [r for r in rows if not math.isfinite(r["loss"])]
    print(f"log.jsonl: steps {got}, losses {[round(r['loss'], 4) for r in rows]}")
    if got != list(range(1, steps + 1)) or bad:
        sys.exit(f"FAIL: expected steps 1..{steps} with finite losses")
    print("OK")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("tiny", help="write the tiny bundle and images").add_argument("dir")
    log = sub.add_parser("log", help="check a run's log.jsonl")
    log.add_argument("run")
    log.add_argument("steps", type=int)
    args = p.parse_args(argv)
    tiny(args.dir) if args.cmd == "tiny" else check_log(args.run, args.steps)


if __name__ == "__main__":
    main()
