"""Training data: the micro-batch interface every task feeds train.py (TaskData), the deterministic, resumable
order items are read in, and the text-to-image task's image + caption folders.

Two layouts, as in the Hugging Face `imagefolder` convention:
    data/cat.png + data/cat.txt           a caption file beside each image (same name, .txt)
    data/metadata.jsonl                   one {"file_name": "cat.png", "text": "a cat"} per line

Every image is converted to RGB (transparency onto white), resized (aspect kept) to cover --resolution (a
side: a square, or HxW such as the paper's 384x512) and cropped to it (the centre, or --crop random), mirrored
left-right with --random-flip, then scaled to [-1, 1] as the VAE expects. Several sources (depth) are mixed
with --data-weights, the source of each stream position drawn from (seed, position) alone (mixture_batches).
"""
import argparse
import functools
import itertools
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import diff2flow
from common import atomic_path, open_rgb, rgb_array, written_once

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DATA = os.path.join(ROOT, "runs", "data")  # where the demo presets' data is made once
N_DEMO = 4096  # items of the demo data: toy/synth.py / toy/scenes.py items 0..n-1 of their training streams

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    """The data cannot be used; the message is one line naming the files and what to do."""


def _names(paths, root, k=5):
    """'a.png, b.png, ... (+3 more)': enough to find the files, short enough for one line."""
    shown = ", ".join(os.path.relpath(p, root) for p in paths[:k])
    return shown + (f", ... (+{len(paths) - k} more)" if len(paths) > k else "")


def read_text(path):
    """A caption, prompt or metadata file as UTF-8 (a BOM dropped); not UTF-8 is a DataError naming the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); convert it, e.g. "
                        f"iconv -f latin1 -t utf-8 (or your editor's save as UTF-8)") from None


def read_captions_txt(root):
    """Images anywhere below `root` (sorted, so the order is the same on every machine) + their .txt."""
    images = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                    if f.lower().endswith(IMAGE_EXTS))
    if not images:
        raise DataError(f"{root}: no images ({' '.join(IMAGE_EXTS)}) and no metadata.jsonl")
    missing = [p for p in images if not os.path.isfile(os.path.splitext(p)[0] + ".txt")]
    if missing:
        raise DataError(f"{root}: {len(missing)} of {len(images)} images have no caption: {_names(missing, root)}; "
                        "put NAME.txt beside each image or write a metadata.jsonl (file_name, text)")
    return images, [read_text(os.path.splitext(p)[0] + ".txt").strip() for p in images]


def read_metadata_jsonl(path):
    """metadata.jsonl lines {"file_name": ..., "text": ...}; file names are relative to its folder."""
    root, images, captions = os.path.dirname(path), [], []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{n}: not a JSON object") from None
        if not isinstance(row, dict) or "file_name" not in row or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{n}: caption missing: each line needs \"file_name\" and a \"text\" string")
        images.append(os.path.join(root, row["file_name"]))
        captions.append(row["text"].strip())
    if not images:
        raise DataError(f"{path}: no entries")
    return images, captions


def _unreadable(path, resolution):
    """Why an image cannot be used, or None. It decodes the pixels: headers alone miss truncated files."""
    try:
        open_rgb(path, parse_resolution(resolution, 0)[::-1])
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        return f"{type(e).__name__}: {e}"
    return None


def parse_resolution(spec, low=8):
    """--resolution: 512 (a square) or HxW, height first as the paper writes 384x512 -> (H, W) ints; else a
    ValueError saying what to write."""
    if isinstance(spec, (tuple, list)):
        h, w = map(int, spec)
    else:
        parts = str(spec).strip().lower().split("x")
        if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--resolution {spec}: give one side in pixels (512) or HEIGHTxWIDTH (384x512)")
        h, w = int(parts[0]), int(parts[-1])
    if min(h, w) < low:
        raise ValueError(f"--resolution must be >= {low}, got {spec}")
    return h, w


def resolution_value(hw):
    """(H, W) -> what train.py records as --resolution: an int when square (as before: old checkpoints and
    metadata read the same), else "HxW"."""
    h, w = parse_resolution(hw)
    return h if h == w else f"{h}x{w}"


def crop_box(w, h, out_w, out_h, crop=None):
    """Left, top of an out_w x out_h window in a w x h image: the centre, or where crop = (fy, fx), uniforms in
    [0, 1), puts it (each offset uniform over the possible ones: random crops)."""
    if crop is None:
        return (w - out_w) // 2, (h - out_h) // 2
    fy, fx = crop
    return min(w - out_w, int(fx * (w - out_w + 1))), min(h - out_h, int(fy * (h - out_h + 1)))


def load_image(path, resolution, crop=None, flip=False):
    """File -> (3, H, W) float32 in [-1, 1]: RGB, resized (aspect kept) to cover H x W = resolution (an int: a
    square), then cropped to H x W (crop_box: centre unless `crop`), mirrored left-right if `flip`."""
    H, W = parse_resolution(resolution)
    im = open_rgb(path, (W, H))
    scale = max(H / im.height, W / im.width)
    w, h = max(W, round(im.width * scale)), max(H, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BICUBIC)
    left, top = crop_box(w, h, W, H, crop)
    im = im.crop((left, top, left + W, top + H))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if im.mode == "F":  # 16-bit grey: keep its precision
        return torch.from_numpy(rgb_array(im)).permute(2, 0, 1).float() * 2 - 1
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return x.float() / 127.5 - 1


class FolderDataset(torch.utils.data.Dataset):
    """dataset[i] -> (image (3, R, R) in [-1, 1], caption). Unreadable images are skipped with a warning
    naming them; if half or more are unreadable the data is wrong, not noisy, and it is an error."""

    def __init__(self, path, resolution):
        if min(parse_resolution(resolution, 0)) < 1:  # what the model needs (its multiple) train.py checks
            raise DataError(f"resolution {resolution} must be >= 1")
        path = os.fspath(path)
        if path.endswith(".jsonl") and os.path.isfile(path):
            images, captions = read_metadata_jsonl(path)
        elif os.path.isfile(os.path.join(path, "metadata.jsonl")):
            images, captions = read_metadata_jsonl(os.path.join(path, "metadata.jsonl"))
        elif os.path.isdir(path):
            images, captions = read_captions_txt(path)
        else:
            raise DataError(f"{path}: no such folder; pass a folder of images + .txt captions or a metadata.jsonl")
        root = path if os.path.isdir(path) else os.path.dirname(path)
        bad = {p: why for p in images if (why := _unreadable(p, resolution))}
        if bad:
            first_reason = next(iter(bad.values()))
            msg = f"{len(bad)} of {len(images)} images are unreadable: {_names(list(bad), root)} ({first_reason})"
            if 2 * len(bad) >= len(images):
                raise DataError(f"{root}: {msg}; is this the right folder?")
            warnings.warn(f"{root}: skipping {msg}", stacklevel=2)
        keep = [i for i, p in enumerate(images) if p not in bad]
        self.files, self.captions = [images[i] for i in keep], [captions[i] for i in keep]
        self.resolution = resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        i, crop, flip = key if isinstance(key, tuple) else (key, None, False)  # augment_keys' (item, crop, flip)
        try:
            return load_image(self.files[i], self.resolution, crop, flip), self.captions[i]
        except Exception as e:  # it decoded when checked: the file changed since
            raise DataError(f"{self.files[i]}: cannot decode ({type(e).__name__}: {e}); "
                            "replace or remove it, then --resume") from None


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    """The permutation of epoch `epoch`: a function of (seed, epoch) only, so any position can be recomputed."""
    return tuple(np.random.default_rng([seed, epoch]).permutation(n).tolist())


def stream_indices(n, seed, start, count):
    """Items start .. start+count-1 of the endless stream epoch 0, epoch 1, ... (each a fresh permutation).
    `start` (samples consumed so far) is the whole data position: resuming needs nothing else."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), n)
        out += epoch_order(n, seed, epoch)[offset:offset + count - len(out)]
    return out


def batch_indices(cfg, n, position, rank, world):
    """Dataset indices of this process's micro-batches, from stream position `position` on. Each step takes
    the next G = grad_accum x world x batch_size positions, laid out as [micro-step][rank][item]: so the same
    global batch spread over fewer or more processes sees the same items per step."""
    G = cfg.batch_size * cfg.grad_accum * world
    for pos in itertools.count(position, G):
        idx = stream_indices(n, cfg.seed, pos, G)
        for m in range(cfg.grad_accum):
            start = (m * world + rank) * cfg.batch_size
            yield idx[start:start + cfg.batch_size]


def batch_positions(cfg, position, rank, world):
    """The stream positions of this process's micro-batches, in batch_indices' layout (ranges of batch_size)."""
    G = cfg.batch_size * cfg.grad_accum * world
    for pos in itertools.count(position, G):
        for m in range(cfg.grad_accum):
            start = pos + (m * world + rank) * cfg.batch_size
            yield range(start, start + cfg.batch_size)


BLOCK = 4096  # stream positions per block of position_uniforms
MIX, AUGMENT = 1, 2  # position_uniforms' salts: a mixture's source draws, augmentation draws


def position_uniforms(seed, salt, start, count, k=1):
    """(count, k) uniforms in [0, 1) for stream positions start .. start+count-1. Row p is a function of (seed,
    salt, p) only (block p // BLOCK of a generator seeded with (seed, salt, block)): what a resumed run, or one
    on another number of processes, draws for a position is what an uninterrupted one drew."""
    out, p, end = [np.zeros((0, k))], start, start + count
    while p < end:
        block, offset = divmod(p, BLOCK)
        take = min(BLOCK - offset, end - p)
        out.append(np.random.default_rng([seed, salt, block]).random((BLOCK, k))[offset:offset + take])
        p += take
    return np.concatenate(out)


def augment_keys(cfg, items, positions):
    """A micro-batch's items -> (item, crop, flip) keys for the datasets: a crop placement (--crop random; None:
    the centre) and a left-right mirror (--random-flip, probability 1/2), drawn per stream position."""
    u = position_uniforms(cfg.seed, AUGMENT, positions.start, len(positions), 3)
    return [(i, (a, b) if cfg.crop == "random" else None, bool(cfg.random_flip and c < 0.5))
            for i, (a, b, c) in zip(items, u.tolist())]


def mixture_batches(cfg, sizes, weights, position, rank, world):
    """Several sources mixed by `weights`: this process's micro-batches as lists of (source, item) from stream
    position `position` on, in batch_indices' layout. Position p's source is drawn from position_uniforms
    (seed and p only); source s is read along its own endless stream of shuffled epochs (stream_indices with
    seed (seed, s)), at the count of its earlier draws, recounted from the draws alone when resuming."""
    cum = np.cumsum(weights) / sum(weights)
    pick = lambda start, count: np.minimum(np.searchsorted(
        cum, position_uniforms(cfg.seed, MIX, start, count)[:, 0], side="right"), len(sizes) - 1)
    counts = np.zeros(len(sizes), np.int64)
    for start in range(0, position, BLOCK):
        counts += np.bincount(pick(start, min(BLOCK, position - start)), minlength=len(sizes))
    seeds = [int(np.random.SeedSequence([cfg.seed, s]).generate_state(1)[0]) for s in range(len(sizes))]
    G = cfg.batch_size * cfg.grad_accum * world
    for pos in itertools.count(position, G):
        src, items = pick(pos, G), np.zeros(G, np.int64)
        for s in range(len(sizes)):
            where = np.flatnonzero(src == s)
            items[where] = stream_indices(sizes[s], seeds[s], int(counts[s]), len(where))
            counts[s] += len(where)
        for m in range(cfg.grad_accum):
            start = (m * world + rank) * cfg.batch_size
            yield list(zip(src[start:start + cfg.batch_size].tolist(), items[start:start + cfg.batch_size].tolist()))


def parse_weights(text, n):
    """--data-weights "0.9,0.1" -> n floats >= 0 with a positive sum; empty: None (the sources' sizes)."""
    if not text:
        return None
    try:
        w = [float(x) for x in str(text).split(",")]
    except ValueError:
        w = []
    if len(w) != n or min(w) < 0 or not 0 < sum(w) < float("inf"):
        raise ValueError(f"--data-weights {text}: give {n} non-negative numbers separated by commas, one per "
                         f"--data (e.g. {','.join(['1'] * n)})")
    return w


class Sources(argparse.Action):
    """--data once: that path (as ever); --data again: the list of sources, mixed by --data-weights."""

    def __call__(self, parser, namespace, value, option=None):
        old = getattr(namespace, self.dest)
        setattr(namespace, self.dest, value if old is None else [*([old] if isinstance(old, str) else old), value])


def check_options(cfg, meta):
    """train.py's data options made canonical before anything is loaded (a ValueError: a usage error):
    --resolution (an int, or "HxW" when not square), several --data (depth only) and their --data-weights,
    augmentation without --cache; the demo data's paths (their make() returned) and absolute paths (recorded)."""
    cfg.resolution = resolution_value(parse_resolution(cfg.resolution or meta.get("resolution", 512)))
    if isinstance(cfg.data, list) and cfg.task != "depth":  # as for any option given twice, the last one wins
        warnings.warn(f"--data given {len(cfg.data)} times: --task {cfg.task} reads one source, the last "
                      "(mixing sources is --task depth's)")
        cfg.data = cfg.data[-1]
    many = isinstance(cfg.data, list)
    sources = cfg.data if many else [cfg.data]
    parse_weights(cfg.data_weights, len(sources))
    if cfg.data_weights and not many:
        raise ValueError("--data-weights mixes several --data; give --data once per source")
    if cfg.cache and (cfg.random_flip or cfg.crop == "random"):
        raise ValueError("--random-flip and --crop random change the pixels of each draw: use them with --no-cache")
    made = [demo(s, max(parse_resolution(cfg.resolution))) for s in sources] + [demo(cfg.prompts, 0)]
    absolute = lambda p: os.path.abspath(p) if p and os.path.exists(p) else p  # else a repo id
    paths = [absolute(p) for p, _ in made]
    cfg.data, cfg.prompts = paths[:-1] if many else paths[0], paths[-1]
    return [m for _, m in made if m]


# ----------------------------------------------------------------------------- the interface of tasks

@dataclass
class Env:
    """Where a task runs: the device, the autocast context (a callable), and this process's place in DDP."""
    device: str
    amp: Callable
    rank: int = 0
    world: int = 1

    @property
    def master(self):
        return self.rank == 0


@dataclass
class TaskData:
    """What a task feeds train.py: `n` items and `batches(position)` -> this process's endless micro-batches
    from a stream position (samples consumed so far: the whole resume state), as dicts on the device:
    "x1" (target latents (B, C, h, w)), "context" (text embeddings (B, 77, width)), optionally "noise" (a fixed
    FM x_0 per item, e.g. reflow pairs) and "cond" (latents concatenated to the UNet input along channels, e.g.
    depth's image latent). Items are read as they are needed, so a task can stream from disk."""
    n: int
    batches: Callable[[int], Iterator[dict]]
    prompts: list  # what the sample grids show (the first one is suggested to try)
    grid: Callable  # (unet, objective, path) -> writes the sample grid PNG (fixed inputs and noise)
    what: str = "images"
    meta: dict = field(default_factory=dict)  # final.safetensors metadata over the base's (reflow: steps=4, cfg=1)


def draw(cfg, objective, step, n, shape, T, device):
    """Noise, timesteps and caption-dropout flags of the whole global step (n items) from a generator seeded
    with (seed, step): every process draws the same numbers and keeps its slice, so N processes see what one
    process with the same global batch sees, and a resumed run redraws exactly what it would have."""
    g = torch.Generator(device).manual_seed(int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0]))
    noise = torch.randn((n, *shape), generator=g, device=device)
    if objective == "diffusion":  # integer timesteps, as SD was trained (diffusion_loss's own default)
        t = (torch.rand(n, generator=g, device=device, dtype=torch.float64) * T).floor().clamp(max=T - 1)
    else:
        t = diff2flow.sample_fm_time(n, cfg.t_sampling, g, device)
    return noise, t, torch.rand(n, generator=g, device=device) < cfg.caption_dropout


@torch.no_grad()
def sample_grid(bundle, unet, objective, context, uncond, noise, path, amp, steps=25, cfg=7.5):
    """One row of images for the fixed prompts and noise, saved atomically as PNG."""
    model = diff2flow.velocity_model(unet, bundle.alphas_cumprod, bundle.prediction, objective)
    unet.eval()
    with amp():
        z = diff2flow.sample_euler(model, noise, steps, context, uncond, cfg)
        images = bundle.vae.decode(z.to(next(bundle.vae.parameters()).dtype)).float()
    unet.train()
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # (N, 3, H, W)
    grid = images.permute(2, 0, 3, 1).flatten(1, 2)  # (H, N*W, 3): the images side by side
    with atomic_path(path) as tmp:
        Image.fromarray(grid.numpy()).save(tmp)


def latent_shape(bundle, resolution):
    """(C, H/f, W/f): the latent of an image of --resolution (an int side, or "HxW")."""
    f, (H, W) = bundle.vae.downsample, parse_resolution(resolution)
    return bundle.vae.cfg.embed_dim, H // f, W // f


def text_grid(cfg, bundle, env, prompts, steps=25, scale=7.5):
    """A text-to-image task's grid: the prompts (--sample-prompts, else `prompts`), noise from --seed.
    Returns (the prompts, grid(unet, objective, path))."""
    if cfg.sample_prompts:
        prompts = [line.strip() for line in read_text(cfg.sample_prompts).splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"--sample-prompts {cfg.sample_prompts}: no prompts in it (one per line)")
    shape = latent_shape(bundle, cfg.resolution)
    noise = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(cfg.seed)).to(env.device)
    context, empty = bundle.encode_prompt(prompts).float(), bundle.encode_prompt([""]).float()
    return prompts, lambda unet, objective, path: sample_grid(bundle, unet, objective, context, empty, noise, path,
                                                              env.amp, steps, scale)


def demo(spec, resolution):
    """--data / --prompts of the demo presets ("demo:shapes", "demo:scenes", "demo:prompts") -> (the path under
    runs/data/, make() writing it once with the toy's writer, the program that owns that data); else (spec, None)."""
    kind = spec.removeprefix("demo:") if spec and spec.startswith("demo:") else None
    if kind is None:
        return spec, None
    if kind == "prompts":  # synth.py captions, shortened at random as the prior's training captions were
        folder = os.path.join(DEMO_DATA, f"prompts-seed0-n{N_DEMO}")
        path, args = os.path.join(folder, "prompts.txt"), ["synth.py", "--prompts", "PATH", "--n", N_DEMO]
    else:
        folder = path = os.path.join(DEMO_DATA, f"{kind}-{resolution}px-seed0-n{N_DEMO}")
        args = ["synth.py" if kind == "shapes" else "scenes.py", "--out", "PATH", "--n", N_DEMO, "--size", resolution]
    cmd = [sys.executable, os.path.join(ROOT, "toy", args[0])] + [path if a == "PATH" else str(a) for a in args[1:]]

    def make():
        print(f"making the demo data once: {os.path.relpath(folder)} ({' '.join(cmd[1:])})")
        written_once(folder, lambda p: (os.makedirs(p, exist_ok=True), subprocess.run(
            cmd + ["--seed", "0"], check=True, stdout=subprocess.DEVNULL)))
    return path, make


# ----------------------------------------------------------------------------- --task t2i

@torch.no_grad()
def encode(bundle, images, captions, amp):
    """Images (B, 3, R, R) in [-1, 1] -> latent means (B, 4, R/f, R/f); captions -> context (B, 77, width)."""
    with amp():
        return bundle.vae.encode(images).float(), bundle.encode_prompt(list(captions)).float()


def build_cache(cfg, ds, bundle, env):
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers)
    lat, ctx = [], []
    for images, captions in tqdm(loader, desc="caching latents and text", dynamic_ncols=True):
        z, c = encode(bundle, images.to(env.device), captions, env.amp)
        lat.append(z.cpu())
        ctx.append(c.cpu())
    return torch.cat(lat), torch.cat(ctx)


def cached_data(cfg, ds, bundle, env):
    """--cache: rank 0 encodes the data once into --out/cache.pt (reused while data and model are unchanged)."""
    path = os.path.join(cfg.out, "cache.pt")
    mtime = os.path.getmtime(cfg.ckpt) if os.path.exists(cfg.ckpt) else 0.0
    key = {"files": ds.files, "captions": ds.captions, "resolution": cfg.resolution, "ckpt": cfg.ckpt, "mtime": mtime}
    if env.master:
        cache = torch.load(path, weights_only=True) if os.path.exists(path) else None
        if cache is None or cache["key"] != key:
            latents, context = build_cache(cfg, ds, bundle, env)
            cache = {"key": key, "latents": latents, "context": context}
            os.makedirs(cfg.out, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(cache, tmp)
    if env.world > 1:
        torch.distributed.barrier()
        if not env.master:
            cache = torch.load(path, weights_only=True)
    return cache["latents"], cache["context"]


def t2i_task(cfg, bundle, env):
    """--task t2i: images + captions from --data (FolderDataset), decoded by workers per micro-batch, or with
    --cache encoded once (latent means and text embeddings) and then only indexed."""
    ds = FolderDataset(cfg.data, cfg.resolution)
    cache = cached_data(cfg, ds, bundle, env) if cfg.cache else None

    def batches(position):
        indices = batch_indices(cfg, len(ds), position, env.rank, env.world)
        if cache is not None:
            for idx in map(torch.tensor, indices):
                yield {"x1": cache[0][idx].to(env.device), "context": cache[1][idx].to(env.device)}
            return
        if cfg.random_flip or cfg.crop == "random":  # (item, crop, flip) keys, drawn per stream position
            indices = map(functools.partial(augment_keys, cfg), indices,
                          batch_positions(cfg, position, env.rank, env.world))
        # generator=: the loader must not draw from the global RNG, whose state --resume restores
        loader = torch.utils.data.DataLoader(ds, batch_sampler=indices, num_workers=cfg.workers,
                                             generator=torch.Generator(), pin_memory=env.device.startswith("cuda"))
        for images, captions in loader:
            x1, context = encode(bundle, images.to(env.device, non_blocking=True), captions, env.amp)
            yield {"x1": x1, "context": context}
    prompts, grid = text_grid(cfg, bundle, env, list(dict.fromkeys(ds.captions))[:4])
    return TaskData(len(ds), batches, prompts, grid)
