"""CPU benchmarks of our modules against the diffusers/transformers implementations (a script, not a test).

Each benchmark is a function registered with @benchmark("name"); it returns table rows
(what, ours, reference, unit) and `--only name[,name]` selects which run. diffusers is imported only
inside this script's functions: it is the yardstick, never a dependency of the core modules.

    flock /tmp/heavy.lock python bench.py                 # everything, 2 threads
    flock /tmp/heavy.lock python bench.py --only unet --size 64 --batch 2 --repeat 5
"""
import argparse
import platform
import time

import torch

BENCHMARKS = {}  # name -> fn(args) -> list of (what, ours, reference, unit)


def benchmark(name: str):
    def register(fn):
        BENCHMARKS[name] = fn
        return fn
    return register


def best_of(fns, repeat: int, warmup: int) -> list[float]:
    """Best wall time in seconds of each fn over `repeat` calls after `warmup` untimed ones. The fns are
    interleaved so that load from other jobs on a shared machine hits them alike; the best (not the mean)
    is the least noisy estimate of the undisturbed time."""
    best = [float("inf")] * len(fns)
    for i in range(warmup + repeat):
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                best[j] = min(best[j], time.perf_counter() - start)
    return best


@torch.no_grad()
def random_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fast seeded weights with O(1) activations (to_empty() leaves garbage that may hold NaNs/denormals,
    which would distort timings)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.normal_(generator=g)
        p /= p[0].numel() ** 0.5 if p.ndim > 1 else 10.0
    return model


def sd15_unet_pair():
    """Our SD1.5 UNet and diffusers' UNet2DConditionModel sharing the same weight tensors, the latter
    obtained through diffusers' own LDM checkpoint converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from unet import PRESETS, UNet
    cfg = PRESETS["sd15"]
    with torch.device("meta"):
        ours = UNet(cfg)
    random_init(ours.to_empty(device="cpu")).eval()
    config = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                  layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ldm, config), strict=True, assign=True)
    return ours, ref.eval()


@benchmark("unet")
def bench_unet(args):
    ours, ref = sd15_unet_pair()
    x = torch.randn(args.batch, 4, args.size, args.size)
    fmt = ""
    if args.channels_last:  # both sides; ours keeps the layout through its SpatialTransformers
        ours, ref, x = (m.to(memory_format=torch.channels_last) for m in (ours, ref, x))
        fmt = " channels_last"
    t = torch.full((args.batch,), 500.0)
    ctx = torch.randn(args.batch, 77, 768)
    rows = []
    for precision, dtype in [("fp32", None), ("bf16 autocast", torch.bfloat16)]:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            ours_s, ref_s = best_of([lambda: ours(x, t, ctx), lambda: ref(x, t, encoder_hidden_states=ctx)],
                                    args.repeat, args.warmup)
        rows.append((f"unet sd15 fwd {args.batch}x4x{args.size}x{args.size} {precision}{fmt}", ours_s * 1e3, ref_s * 1e3, "ms"))
    return rows


# Child processes for the "load" benchmark: peak RSS (ru_maxrss) is per process, so writing the file and
# loading it must happen in fresh processes of their own.
_WRITE = """
import sys, torch, sd
from bench import random_init
b = sd.create(unet="sd15", vae="sd", text="sd1", version="sd1", prediction="eps")
for m in (b.unet, b.vae, b.text_encoder):
    random_init(m)
sd.save(b, sys.argv[1], dtype=getattr(torch, sys.argv[2]))
"""
_LOAD = """
import resource, sys, torch, sd
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sd.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB
"""


@benchmark("load")
def bench_load(args):
    """Peak RSS of sd.load on a full-size SD1.5 single file, against the file's size (target <= 1.3x)."""
    import os
    import subprocess
    import sys
    import tempfile
    rows, root = [], os.path.dirname(os.path.abspath(__file__))
    for file_dtype, load_dtype in [("float16", "float16"), ("float32", "float32"), ("float32", "bfloat16")]:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "sd15.safetensors")
            subprocess.run([sys.executable, "-c", _WRITE, path, file_dtype], check=True, cwd=root)
            out = subprocess.run([sys.executable, "-c", _LOAD, path, load_dtype], check=True, cwd=root,
                                 capture_output=True, text=True).stdout.split()
            size = os.path.getsize(path) / 2**20
        base, peak = int(out[0]) / 1024, int(out[1]) / 1024
        rows.append((f"load sd15 {file_dtype} file as {load_dtype}: peak RSS (python+torch {base:.0f} MiB) vs file",
                     peak, size, "MiB"))
    return rows


# Later rows register here the same way: VAE decode, text encoding, sampling. Training-step rows
# (Diff2Flow vs diffusion step time, LoRA vs full memory) are in bench_train.py.


def print_table(rows):
    head = ("benchmark", "ours", "reference", "unit", "ours/ref")
    body = [(what, f"{a:.1f}", f"{b:.1f}", unit, f"{a / b:.3f}") for what, a, b, unit in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *body]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated benchmarks to run, from: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--size", type=int, default=32, help="latent height = width (default 32)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--channels-last", action="store_true",
                        help="run models and inputs in torch.channels_last memory format (both sides)")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls; the best is reported (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHMARKS)}")

    import diffusers
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}")
    print(f"device cpu ({platform.processor() or platform.machine()}), threads {torch.get_num_threads()}, "
          f"best of {args.repeat} after {args.warmup} warm-up\n")
    rows = [row for name in names for row in BENCHMARKS[name](args)]
    print_table(rows)


if __name__ == "__main__":
    main()
