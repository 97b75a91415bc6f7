"""Data benchmark (issue #15): seconds from start to the first optimizer step and peak RSS at 1k, 10k and 100k
items, per task and data format, and decoded images/s per worker at 512 px. Not a test.

    nice python bench/bench_data.py make                   # the synthetic items, once, into /tmp/bench_data
    nice python bench/bench_data.py startup                # every row of FORMATS (--task t2i: only its rows)
    nice python bench/bench_data.py decode                 # images/s of one process at 512 px

`startup` runs train.py in a fresh process per row (the bundled tiny prior, 32 px, batch 8, 2 DataLoader
workers, no --cache) and stops it at its first optimizer step: the time from the process start and the peak
RSS (Linux VmHWM) of the training process and of its workers then. Items are small synthetic 64x64 JPEGs with
captions, so the numbers are the data path's fixed and per-item costs, not the decode (see `decode`).
A task's rows: FORMATS[(task, format)] = (make(folder, n), train.py arguments for that folder); reflow and depth
add theirs the same way.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402

PRIOR = os.path.join(ROOT, "assets", "demo", "prior_tiny.safetensors")
PER_SHARD = 250  # items per tar shard (img2dataset's default: 10000; small ones here so that 1k items make 4)


def synthetic_jpeg(i, size=(64, 64), quality=90):
    """A smooth image (a gradient and a disc, as photos are smooth) with a little noise: item i, as JPEG bytes."""
    rng = np.random.default_rng(i)
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a = np.stack([x * rng.random() * 255, y * rng.random() * 255, (x + y) * 127 * rng.random()], -1)
    cy, cx, r = rng.random(3) * [h, w, min(h, w) / 3]
    a[(np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r ** 2] = rng.integers(0, 256, 3)
    a = (a + rng.normal(0, 4, a.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_folder(folder, n):
    """n items as img/NNN/KEY.jpg + KEY.txt (1000 per subfolder, as large image folders are kept)."""
    for i in range(n):
        d = os.path.join(folder, f"{i // 1000:03d}")
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, f"{i:07d}.jpg"), "wb").write(synthetic_jpeg(i))
        open(os.path.join(d, f"{i:07d}.txt"), "w").write(f"a synthetic picture number {i}")


def make_shards(folder, n):
    """n items as img2dataset writes them: shards of PER_SHARD KEY.jpg + KEY.txt + KEY.json."""
    os.makedirs(folder, exist_ok=True)
    for s in range(-(-n // PER_SHARD)):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(s * PER_SHARD, min(n, (s + 1) * PER_SHARD)):
                for ext, payload in (("jpg", synthetic_jpeg(i)), ("txt", f"a synthetic picture number {i}".encode()),
                                     ("json", json.dumps({"key": f"{i:07d}", "status": "success"}).encode())):
                    info = tarfile.TarInfo(f"{i:07d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


T2I = ["--task", "t2i", "--ckpt", PRIOR, "--resolution", "32", "--batch-size", "8", "--workers", "2", "--no-cache",
       "--sample-every", "0", "--save-every", "0", "--steps", "1"]
CACHED = [a if a != "--no-cache" else "--cache" for a in T2I] + ["--batch-size", "64"]  # the encode batch too
FORMATS = {  # (task, format) -> (make(folder, n), train.py arguments)
    ("t2i", "folder"): (make_folder, T2I),
    ("t2i", "shards"): (make_shards, T2I),
    ("t2i", "folder+cache"): (make_folder, CACHED),  # start-up includes encoding every item: O(n); RSS is the point
}

# The child: train.main, stopped at the end of its first optimizer step with the time and peak memory then.
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch
import train

def hwm_mb(pid="self"):
    with open(f"/proc/{{pid}}/status") as f:
        return next((int(l.split()[1]) for l in f if l.startswith("VmHWM:")), 0) / 1024  # 0: a zombie

def workers():
    pids = []
    for t in os.listdir("/proc/self/task"):
        pids += open(f"/proc/self/task/{{t}}/children").read().split()
    return pids

real = torch.optim.AdamW.step
def first_step(self, *a, **kw):
    real(self, *a, **kw)
    print(json.dumps(dict(t=time.time(), rss_mb=hwm_mb(), workers_mb=sum(hwm_mb(p) for p in workers()))), flush=True)
    os._exit(0)
torch.optim.AdamW.step = first_step
train.main(sys.argv[1:])
"""


def data_folder(root, task, fmt, n):
    return os.path.join(root, f"{task}-{fmt.split('+')[0]}-{n}")  # folder+cache: the folder's items


def make(args):
    for (task, fmt), (write, _) in FORMATS.items():
        for n in args.n:
            folder = data_folder(args.root, task, fmt, n)
            if args.task in (None, task) and not os.path.exists(os.path.join(folder, "done")):
                t = time.time()
                data.written_once(folder, lambda p: write(p, n))
                print(f"made {folder} in {time.time() - t:.0f} s")


def run_child(root, argv, what):
    """One fresh train.py process (CHILD, the code at root) with argv: (seconds to the end of its first optimizer
    step, its peak RSS MB, its DataLoader workers' MB). bench_data_pairs.py measures its rows with it too."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", CHILD.format(root=root), *argv], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"{what}: no first step:\n{r.stderr[-2000:]}")
    row = json.loads(lines[-1])
    return row["t"] - t0, row["rss_mb"], row["workers_mb"]


def startup_row(args, task, fmt, n):
    out = os.path.join(args.root, "runs", f"{task}-{fmt}-{n}-{time.time_ns()}")
    argv = [*FORMATS[(task, fmt)][1], "--data", data_folder(args.root, task, fmt, n), "--out", out]
    return run_child(os.path.abspath(args.code), argv, f"{task} {fmt} {n}")


def startup(args):
    """Every row `--repeat` times, the rows interleaved (a shared machine's load drifts over minutes: it then
    hits every size alike); the best of each row is reported."""
    rows = [(task, fmt, n) for task, fmt in FORMATS if args.task in (None, task) and args.format in (None, fmt)
            for n in args.n]
    runs = {row: [] for row in rows}
    for _ in range(args.repeat):
        for row in rows:
            runs[row].append(startup_row(args, *row))
    print("| task | format | items | start-up to the first step (s) | peak RSS, trainer (MB) | peak RSS, 2 workers "
          "(MB) |\n|---|---|---:|---:|---:|---:|")
    for (task, fmt, n), results in runs.items():
        t, rss, workers = (min(r[i] for r in results) for i in range(3))
        print(f"| {task} | {fmt} | {n} | {t:.2f} | {rss:.0f} | {workers:.0f} |")


def decode(args):
    """Decoded + resized + cropped images/s of one process at 512 px, as a DataLoader worker does them: files
    (load_image) and tar members (shard_record), 640x512 synthetic JPEGs (~q90)."""
    jpegs = [synthetic_jpeg(i, (512, 640)) for i in range(args.images)]
    folder = os.path.join(args.root, "decode")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, b in enumerate(jpegs):
        paths.append(os.path.join(folder, f"{i}.jpg"))
        open(paths[-1], "wb").write(b)
    for name, one in (("file, load_image", lambda i: data.load_image(paths[i], 512)),
                      ("tar member, shard_record", lambda i: data.shard_record(512, "s", str(i),
                                                                               {"jpg": jpegs[i], "txt": b"x"}))):
        best = 0.0
        for _ in range(args.repeat):
            t = time.perf_counter()
            for i in range(len(jpegs)):
                one(i)
            best = max(best, len(jpegs) / (time.perf_counter() - t))
        print(f"| {name} | 640x512 JPEG, {sum(map(len, jpegs)) / len(jpegs) / 1e3:.0f} kB | {best:.1f} images/s |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["make", "startup", "decode"])
    p.add_argument("--task", default=None, help="only this task's rows (t2i, and those other tasks add)")
    p.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000, 100000])
    p.add_argument("--root", default="/tmp/bench_data", help="where the synthetic items are made once")
    p.add_argument("--repeat", type=int, default=3, help="runs per row; the best is reported")
    p.add_argument("--code", default=ROOT, help="startup: the checkout whose train.py runs (another, to compare)")
    p.add_argument("--format", default=None, help="startup: only this format's rows (folder, shards, ...)")
    p.add_argument("--images", type=int, default=200, help="decode: images per timing")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # a worker decodes on one thread
    {"make": make, "startup": startup, "decode": decode}[args.what](args)


if __name__ == "__main__":
    main()
