"""Training data: the micro-batch interface every task feeds train.py (TaskData), the deterministic, resumable
order items are read in, tar shards read as streams (generic: any task's members), the text-to-image task's
folders and shards, and --cache on disk. `python data.py check DATA` decodes everything beforehand.

Text-to-image --data, as the Hugging Face `imagefolder` convention or webdataset / img2dataset shards:
    data/cat.png + data/cat.txt           a caption file beside each image (same name, .txt)
    data/metadata.jsonl                   one {"file_name": "cat.png", "text": "a cat"} per line
    shards/ or one.tar or shards/{00000..01023}.tar
                                          tar files of KEY.jpg|jpeg|png|webp + KEY.txt (+ KEY.json, ignored)
Folders are listed, not scanned: an unreadable image is skipped when met (named, counted in log.jsonl) and
more than MAX_BAD of what was read is an error. Shards are read as streams with tarfile (tar_groups): members
grouped by key, the key ending at the file name's first dot (webdataset's rule), consecutive members of a key
being one item. The depth layout in the same spirit: KEY.rgb.png|jpg + KEY.depth.png (16-bit) or KEY.depth.npy.

Every image is converted to RGB (transparency onto white), resized (aspect kept) to cover --resolution (a
side: a square, or HxW such as the paper's 384x512) and cropped to it (the centre, or --crop random), mirrored
left-right with --random-flip, then scaled to [-1, 1] as the VAE expects. Several sources (depth) are mixed
with --data-weights, the source of each stream position drawn from (seed, position) alone (mixture_batches).
"""
import argparse
import bisect
import functools
import hashlib
import io
import itertools
import json
import math
import os
import posixpath
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import diff2flow
from common import (atomic_path, fail, one_line_warnings, open_rgb, return_freed_memory, rgb_array, temp_name,
                    usage_error, written_once)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DATA = os.path.join(ROOT, "runs", "data")  # where the demo presets' data is made once
N_DEMO = 4096  # items of the demo data: toy/synth.py / scenes.py / streets.py items 0..n-1 of their training streams
DEMO_KINDS = {"shapes": ("shapes", 1, "synth.py"), "scenes": ("scenes-v3", 2, "scenes.py"),
              "streets": ("streets-v1", 1, "streets.py")}  # folder name (scenes v2: the varied rooms since #18, v3:
# with open fields; so a folder of older scenes is not reused), items in units of N_DEMO, and toy/'s writer

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


# ----------------------------------------------------------------------------- image folders, listed not scanned

def list_folder(root):
    """Images anywhere below `root` (sorted, so the order is the same on every machine) and their NAME.txt, from
    the listing alone: nothing is opened. An image without a caption file is a DataError naming it."""
    images, missing = [], []
    for d, _, files in os.walk(root):
        texts, d = {f[:-4] for f in files if f.endswith(".txt")}, os.path.join(d, "")  # the caption stems here
        for f in files:  # (plain string operations: a million names are listed in seconds)
            if f.lower().endswith(IMAGE_EXTS):
                (images if f.rpartition(".")[0] in texts else missing).append(d + f)
    images += missing  # sorted with the rest, for the message
    if not images:
        raise DataError(f"{root}: no images ({' '.join(IMAGE_EXTS)}), no metadata.jsonl and no .tar shards")
    images.sort()
    if missing:
        missing.sort()
        raise DataError(f"{root}: {len(missing)} of {len(images)} images have no caption: {_names(missing, root)}; "
                        "put NAME.txt beside each image or write a metadata.jsonl (file_name, text)")
    return images


def read_captions_txt(root):
    """list_folder's images + their captions, all read (`python data.py check` and small folders)."""
    images = list_folder(root)
    return images, [read_text(os.path.splitext(p)[0] + ".txt").strip() for p in images]


MAX_BAD, MIN_READ = 0.1, 100  # more than 10% unreadable of what was read (once 100 were, or all) is an error
MAX_TRIES = 100  # an unreadable folder image is replaced by the next readable one within this many


class FolderDataset(torch.utils.data.Dataset):
    """dataset[i] -> (image (3, R, R) in [-1, 1], caption), read when asked: start-up costs the listing only
    (`python data.py check DATA` decodes everything beforehand). Paths are one numpy bytes array: no Python
    object per item whose refcount forked DataLoader workers would copy on write."""

    def __init__(self, path, resolution):
        if min(parse_resolution(resolution, 0)) < 1:  # what the model needs (its multiple) train.py checks
            raise DataError(f"resolution {resolution} must be >= 1")
        path, captions = os.fspath(path), None
        if path.endswith(".jsonl") and os.path.isfile(path):
            images, captions = read_metadata_jsonl(path)
        elif os.path.isfile(os.path.join(path, "metadata.jsonl")):
            images, captions = read_metadata_jsonl(os.path.join(path, "metadata.jsonl"))
        elif os.path.isdir(path):
            images = list_folder(path)
        else:
            raise DataError(f"{path}: no such folder; pass a folder of images + .txt captions, a metadata.jsonl, "
                            "or .tar shards (a .tar, a folder of them, or a pattern shards/{00000..00099}.tar)")
        self.root = path if os.path.isdir(path) else os.path.dirname(path)
        self.files = np.char.encode(images, "utf-8", "surrogateescape")  # os.fsencode's bytes, at numpy's speed
        self.captions, self.resolution = captions, resolution

    def __len__(self):
        return len(self.files)

    def file(self, i):
        return os.fsdecode(self.files[i])

    def caption(self, i):
        """The caption of item i (its .txt read now; not UTF-8 is a DataError naming the file)."""
        if self.captions is not None:
            return self.captions[i]
        return read_text(os.path.splitext(self.file(i))[0] + ".txt").strip()

    def __getitem__(self, i):
        return load_image(self.file(i), self.resolution), self.caption(i)

    def item(self, i, crop=None, flip=False):
        """Item i as a record (`collate`): an unreadable image is skipped for the next readable one, i+1, i+2, ...
        (the same on every run: resuming stays exact), each skipped file named in `skipped`. crop, flip: load_image's
        (augment_keys')."""
        record = dict(skipped=[], read=0)
        for j in range(i, i + min(len(self), MAX_TRIES)):
            j %= len(self)
            record["read"] += 1
            try:
                image = load_image(self.file(j), self.resolution, crop, flip)
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
                record["skipped"].append(f"{self.file(j)}: unreadable ({type(e).__name__}: {e}); skipped")
                continue
            try:
                return dict(record, image=image, caption=self.caption(j))
            except (DataError, OSError) as e:  # a caption is not noise: the user fixes it (workers pass it on)
                return dict(record, error=str(e))
        return dict(record, error=f"{self.root}: {record['read']} images in a row are unreadable, from "
                                  f"{self.file(i)}; run `python data.py check {self.root}`")


NOTES = ("skipped", "cut", "read", "error")  # a record's bookkeeping; its other keys are the item


def collate(records, fill=True):
    """Records -> a micro-batch dict. A record (FolderDataset.item, shard_record, any task's) is the item's fields,
    e.g. "image" (3, R, R) and "caption", each tensor field stacked (B, ...) and the others listed, plus what was
    met on the way: "skipped" / "cut" (one line each), "read" (images tried), "error". A record without "image"
    is a skipped item; fill: its place goes to the next good record of the batch (the batch keeps its size and is
    the same every run), else it is dropped (--cache)."""
    good = [i for i, r in enumerate(records) if "image" in r]
    out = dict(skipped=[s for r in records for s in r["skipped"]], cut=[c for r in records for c in r.get("cut", [])],
               read=sum(r["read"] for r in records), error=next((r["error"] for r in records if "error" in r), ""))
    if fill and not good and records and not out["error"]:
        out["error"] = f"every image of a micro-batch is unreadable, e.g. {out['skipped'][0]}"
    if out["error"] or not good:
        return out
    take = [good[bisect.bisect_left(good, i) % len(good)] for i in range(len(records))] if fill else good
    for k in (k for k in records[good[0]] if k not in NOTES):
        values = [records[i][k] for i in take]
        out[k] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class Skips:
    """What the data readers skipped, seen by the training process: each skipped item and cut shard named in a
    one-line warning, counted in `counts` (log.jsonl: "skipped", "cut_shards"), and a DataError naming files
    once more than MAX_BAD of the images read are unreadable (checked from MIN_READ read, or `n` if fewer)."""

    def __init__(self, root, n=None):
        self.root, self.floor, self.read, self.names, self.counts = root, min(MIN_READ, n or MIN_READ), 0, [], {}

    def __call__(self, batch):
        if batch["error"]:
            raise DataError(batch["error"])
        for line in batch["skipped"] + batch["cut"]:
            warnings.warn(line, stacklevel=2)
        for key, lines in (("skipped", batch["skipped"]), ("cut_shards", batch["cut"])):
            if lines:
                self.counts[key] = self.counts.get(key, 0) + len(lines)
        self.names = list(dict.fromkeys(self.names + [s.split(": ")[0] for s in batch["skipped"]]))[:5]
        self.read += batch["read"]
        bad = self.counts.get("skipped", 0)
        if self.read >= self.floor and bad > MAX_BAD * self.read:
            raise DataError(f"{bad} of the {self.read} images read so far are unreadable (over {MAX_BAD:.0%}): "
                            f"{', '.join(self.names)}; is --data {self.root} right? `python data.py check "
                            f"{self.root}` names every bad file")
        return batch


# ----------------------------------------------------------------------------- tar shards (webdataset layout)
# Any task streams shards so: list_shards(spec) -> paths; check_shards(paths[rank::world], valid, what) at
# start-up; DataLoader(ShardStream(shards, seed, batch_size, rank, world, workers, start, record, valid),
# batch_size=None) -> collate()d micro-batches, each passed through a Skips (warnings, log.jsonl counts, the
# MAX_BAD rule) in the training process. valid(group) -> None or why not, from the suffixes alone (a resume
# fast-forwards without reading data); record(shard, key, group) -> a record with "image" and the task's fields,
# or only "skipped" / "read" if it does not decode. resume_conflicts: what --resume must keep for a stream.

class ShardCut(Exception):
    """A shard ends before its end-of-archive blocks: truncated (a copy or download cut short)."""


def split_key(name):
    """'dir/000123.rgb.png' -> ('dir/000123', 'rgb.png'): webdataset's rule, the key ends at the first dot of the
    file name; the suffix (lower case) says what the member is."""
    base = posixpath.basename(name)
    stem, _, suffix = base.partition(".")
    return name[:len(name) - len(base)] + stem, suffix.lower()


def tar_groups(path, read=lambda: True):
    """One shard -> (key, {suffix: bytes}) for each run of consecutive members with the same key, in file order,
    read with the standard library's tarfile as a stream (one member at a time). read(): asked at each group's
    first member; False gives {suffix: None} (the headers read, the data seeked over: fast-forwarding). A shard
    cut short raises ShardCut after the complete groups before the cut (the group at the cut is dropped)."""
    key, group, cut = None, {}, None
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        size = os.fstat(f.fileno()).st_size
        try:
            while (m := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it read: not needed for a stream
                if not m.isfile():
                    continue
                k, suffix = split_key(m.name)
                if k != key:
                    if group:
                        yield key, group
                    key, group, reading = k, {}, read()
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError(f"{m.name} ends at byte {m.offset_data + m.size} of {size}")
                group[suffix] = tar.extractfile(m).read() if reading else None
            if size - tar.offset < 1024:  # every writer ends a tar with two zero blocks
                cut = f"no end-of-archive blocks after byte {tar.offset}"
        except (tarfile.ReadError, EOFError, OSError) as e:
            cut = f"{type(e).__name__}: {e}"
        if cut:
            raise ShardCut(f"{path}: cut short ({cut}); used the items before the cut")
    if group:
        yield key, group


def expand_braces(pattern):
    """'s/{00000..00002}.tar' -> ['s/00000.tar', 's/00001.tar', 's/00002.tar'] (webdataset's / bash's ranges,
    zero padding kept; several ranges multiply; {a,b,c} lists too)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[:m.start()], pattern[m.end():], m.group(1)
    if r := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        width = len(r[1]) if r[1].startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(r[1]), int(r[2]) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def list_shards(spec):
    """--data as tar shards -> their paths in order: one .tar, a folder of .tar files (sorted) or a brace pattern
    shards/{00000..01023}.tar; None if `spec` is none of these (a folder of images). Nothing is opened."""
    spec = os.fspath(spec)
    if "{" in spec:
        paths = expand_braces(spec)
        missing = [p for p in paths if not os.path.isfile(p)]
        if len(missing) == len(paths):
            raise DataError(f"--data {spec}: the pattern matches no file (first: {paths[0]}); check the folder and "
                            "the {first..last} range")
        if missing:
            raise DataError(f"--data {spec}: {len(missing)} of {len(paths)} shards are missing: "
                            f"{_names(missing, '.')}; fetch them or narrow the range")
        return paths
    if os.path.isfile(spec) and spec.endswith(".tar"):
        return [spec]
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "metadata.jsonl")):
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.endswith(".tar"))
        return paths or None
    return None


def check_shards(paths, valid, what):
    """Each shard is a tar whose first group `valid` accepts (it returns None, else why not): the cheap start-up
    check (one open and a few headers per shard) that names a wrong file before training. `what`: the layout."""
    for p in paths:
        try:
            key, group = next(tar_groups(p, read=lambda: False), (None, None))
        except tarfile.ReadError as e:
            raise DataError(f"{p}: not a tar file ({e}); --data takes uncompressed tar shards of {what}") from None
        except ShardCut:  # cut before its first group ends: met (and named) when read
            continue
        if key is None:
            raise DataError(f"{p}: an empty tar; remove it or write its members ({what})")
        if why := valid(group):
            raise DataError(f"{p}: {key}: {why}; shards need {what}")


def slot_shards(n_shards, seed, epoch, slot, slots):
    """The shards (indices) reader `slot` of `slots` reads in epoch `epoch`: every slots-th of the epoch's
    permutation, so the readers of an epoch split the shards with no overlap and no gap."""
    return epoch_order(n_shards, seed, epoch)[slot::slots]


def reader_stream(shards, seed, slot, slots, valid, read=lambda: True):
    """Reader `slot`'s endless stream: its shards of epoch 0, of epoch 1, ..., each group as ("item", (shard, key,
    group)), or ("skip", line) if `valid` rejects it, ("cut", line) for a shard cut short, ("error", line) if a
    whole epoch gave no item."""
    for epoch in itertools.count():
        found = False
        for i in slot_shards(len(shards), seed, epoch, slot, slots):
            try:
                for key, group in tar_groups(shards[i], read):
                    if why := valid(group):
                        yield "skip", f"{shards[i]}: {key}: {why}; skipped"
                    else:
                        found = True
                        yield "item", (shards[i], key, group)
            except ShardCut as e:
                yield "cut", str(e)
        if not found:
            yield "error", f"reader {slot} of {slots} found no usable item in its shards: use fewer --workers or " \
                           f"processes, or more shards (they have {len(shards)})"
            return


class ShardStream(torch.utils.data.IterableDataset):
    """Tar shards as this process's endless micro-batches, from its micro-batch `start` on (the whole resume
    state). Readers: K = max(workers, 1) per process, world x K in all; process r's micro-batch b comes from its
    DataLoader worker b mod K (the loader's round robin) and is batch b // K of reader r K + b mod K, so a
    position is each reader's offset, b // K x batch_size items, reached by reading headers only: resuming
    repeats the items exactly (with the same processes, workers and batch size; train.py checks). `record`
    (shard, key, group) -> a record for `collate`; `valid` (group) -> why it is unusable, or None."""

    def __init__(self, shards, seed, batch_size, rank, world, workers, start, record, valid):
        self.shards, self.seed, self.batch_size, self.rank, self.world = shards, seed, batch_size, rank, world
        self.workers, self.start, self.record, self.valid = max(workers, 1), start, record, valid

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        K, b = self.workers, self.start + (info.id if info else 0)
        left = [b // K * self.batch_size]  # this reader's items trained on before `start`
        stream = reader_stream(self.shards, self.seed, self.rank * K + b % K, self.world * K, self.valid,
                               read=lambda: left[0] <= 0)
        items, notes = [], dict(skipped=[], cut=[], read=0)
        for kind, x in stream:
            if kind == "error":
                yield collate([dict(skipped=[], read=0, error=x)])
                return
            if left[0] > 0:  # fast-forward; what was skipped then was reported then
                left[0] -= kind == "item"
                continue
            if kind == "item":
                items.append(self.record(*x))
            else:  # a group without what the task needs, or a cut: named, but no item of the stream
                notes["skipped" if kind == "skip" else "cut"].append(x)
                notes["read"] += kind == "skip"
            if len(items) == self.batch_size:
                batch = collate(items)
                yield {**batch, **{k: batch[k] + v for k, v in notes.items()}}
                items, notes = [], dict(skipped=[], cut=[], read=0)


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


def mirror(cfg, images, positions):
    """--random-flip of decoded images (B, 3, H, W): those whose position's draw says so (augment_keys' draw)."""
    if not cfg.random_flip:
        return images
    flip = torch.from_numpy(position_uniforms(cfg.seed, AUGMENT, positions.start, len(positions), 3)[:, 2] < 0.5)
    return torch.where(flip[:len(images), None, None, None], images.flip(-1), images)


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
        old = getattr(namespace, self.dest, None)  # absent: common.given_options parses with defaults suppressed
        setattr(namespace, self.dest, value if old is None else [*([old] if isinstance(old, str) else old), value])


def safe_list_shards(spec):
    try:
        return list_shards(spec) if isinstance(spec, str) else None
    except DataError:  # named when the task reads its data
        return None


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
    if cfg.crop == "random" and safe_list_shards(cfg.data):
        raise ValueError(f"--crop random: tar shards ({cfg.data}) are centre-cropped (folders take random crops); "
                         "drop --crop random")
    if many and any(safe_list_shards(s) for s in sources):
        raise ValueError("--data: tar shards are one source; several --data mix pair folders")
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
    counts: dict = field(default_factory=dict)  # what was skipped so far, e.g. {"skipped": 3}: in log.jsonl


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
    """--data / --prompts of the demo presets ("demo:shapes", "demo:scenes", "demo:streets", "demo:prompts") ->
    (the path under runs/data/, make() writing it once with the toy's writer, the program that owns that data);
    else (spec, None)."""
    kind = spec.removeprefix("demo:") if spec and spec.startswith("demo:") else None
    if kind is None:
        return spec, None
    if kind == "prompts":  # synth.py captions, shortened at random as the prior's training captions were
        folder = os.path.join(DEMO_DATA, f"prompts-seed0-n{N_DEMO}")
        path, args = os.path.join(folder, "prompts.txt"), ["synth.py", "--prompts", "PATH", "--n", N_DEMO]
    else:
        name, n, writer = DEMO_KINDS[kind][0], DEMO_KINDS[kind][1] * N_DEMO, DEMO_KINDS[kind][2]
        folder = path = os.path.join(DEMO_DATA, f"{name}-{resolution}px-seed0-n{n}")
        args = [writer, "--out", "PATH", "--n", n, "--size", resolution]
    cmd = [sys.executable, os.path.join(ROOT, "toy", args[0])] + [path if a == "PATH" else str(a) for a in args[1:]]

    def make():
        def write(p):
            print(f"making the demo data once: {os.path.relpath(folder)} ({' '.join(cmd[1:])})")
            os.makedirs(p, exist_ok=True)
            subprocess.run(cmd + ["--seed", "0"], check=True, stdout=subprocess.DEVNULL)
        written_once(folder, write)
    return path, make


# ----------------------------------------------------------------------------- --task t2i

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
T2I_SHARDS = "KEY.jpg|jpeg|png|webp + KEY.txt per item (img2dataset's output; KEY.json optional)"


def t2i_valid(group):
    """Why a shard's group is no text-to-image item (None: it is one): it needs an image and a .txt caption."""
    if not any(s in group for s in IMAGE_SUFFIXES):
        return "no image (.jpg, .jpeg, .png, .webp)"
    return None if "txt" in group else "no .txt caption"


def shard_record(resolution, shard, key, group):
    """A t2i group -> a record for `collate`: the image decoded as load_image does a file, KEY.txt's caption."""
    ext = next(s for s in IMAGE_SUFFIXES if s in group)
    try:
        image, caption = load_image(io.BytesIO(group[ext]), resolution), group["txt"].decode("utf-8-sig").strip()
    except Exception as e:  # PIL's many types, UnicodeDecodeError: the item is noise in a web crawl, not fatal
        return dict(skipped=[f"{shard}: {key}.{ext}: unreadable ({type(e).__name__}: {e}); skipped"], read=1)
    return dict(image=image, caption=caption, skipped=[], read=1)


@torch.no_grad()
def encode(bundle, images, captions, amp):
    """Images (B, 3, R, R) in [-1, 1] -> latent means (B, 4, R/f, R/f); captions -> context (B, 77, width)."""
    with amp():
        return bundle.vae.encode(images).float(), bundle.encode_prompt(list(captions)).float()


class Records(torch.utils.data.Dataset):
    """A FolderDataset as records (FolderDataset.item) for `collate`."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds.item(*i) if isinstance(i, tuple) else self.ds.item(i)  # augment_keys' (i, crop, flip)


def t2i_source(cfg, env):
    """--data -> (FolderDataset, None) or (None, tar shard paths); this process checks its share of the shards."""
    shards = list_shards(cfg.data)
    if shards is None:
        return FolderDataset(cfg.data, cfg.resolution), None
    check_shards(shards[env.rank::env.world], t2i_valid, T2I_SHARDS)
    readers = env.world * max(cfg.workers, 1)
    if len(shards) < readers and not cfg.cache:
        raise DataError(f"--data {cfg.data}: {len(shards)} shard(s) for {readers} readers ({env.world} process(es) x "
                        f"{max(cfg.workers, 1)} worker(s)), each needs one: use fewer --workers or more shards")
    return None, shards


def first_captions(ds, shards, k=4, look=64):
    """Up to k distinct captions among the first `look` items: the sample grids' default prompts."""
    if ds is not None:
        captions = [ds.caption(i) for i in range(min(look, len(ds)))]
    else:
        captions = []
        try:
            for _, group in itertools.islice(tar_groups(shards[0]), look):
                captions += [group["txt"].decode("utf-8", "replace").strip()] if "txt" in group else []
        except ShardCut:
            pass
    return list(dict.fromkeys(captions))[:k] or [""]


def t2i_task(cfg, bundle, env):
    """--task t2i: images + captions from --data, a folder (FolderDataset) or tar shards (ShardStream), decoded
    by DataLoader workers per micro-batch; or with --cache encoded once to disk (disk_cache), then only read."""
    ds, shards = t2i_source(cfg, env)
    skips = Skips(cfg.data, len(ds) if ds is not None else None)
    cache = disk_cache(cfg, ds, shards, bundle, env, skips) if cfg.cache else None
    # generator=: the loader must not draw from the global RNG, whose state --resume restores
    loader = functools.partial(torch.utils.data.DataLoader, num_workers=cfg.workers, generator=torch.Generator(),
                               pin_memory=env.device.startswith("cuda"))

    def batches(position):
        positions = batch_positions(cfg, position, env.rank, env.world)  # what augmentation is drawn by
        if cache is not None:
            for z, c in loader(cache, batch_sampler=batch_indices(cfg, len(cache), position, env.rank, env.world)):
                yield {"x1": z.to(env.device, non_blocking=True), "context": c.to(env.device, non_blocking=True)}
            return
        if ds is not None:
            indices = batch_indices(cfg, len(ds), position, env.rank, env.world)
            if cfg.random_flip or cfg.crop == "random":  # (item, crop, flip) keys, drawn per stream position
                indices = map(functools.partial(augment_keys, cfg), indices, positions)
            micro = loader(Records(ds), batch_sampler=indices, collate_fn=collate)
        else:
            start = position // (cfg.batch_size * cfg.grad_accum * env.world) * cfg.grad_accum  # micro-batches done
            micro = loader(ShardStream(shards, cfg.seed, cfg.batch_size, env.rank, env.world, cfg.workers, start,
                                       functools.partial(shard_record, cfg.resolution), t2i_valid), batch_size=None)
        for b, where in zip(map(skips, micro), positions):
            images = b["image"] if ds is not None else mirror(cfg, b["image"], where)  # shards: flipped here
            x1, context = encode(bundle, images.to(env.device, non_blocking=True), b["caption"], env.amp)
            yield {"x1": x1, "context": context}
    prompts, grid = text_grid(cfg, bundle, env, first_captions(ds, shards))
    n, what = (len(cache), "images (cached)") if cache is not None else (len(ds), "images") if ds is not None \
        else (len(shards), "tar shards (streamed)")
    return TaskData(n, batches, prompts, grid, what, counts=skips.counts)


def resume_conflicts(cfg, saved, saved_world, world):
    """What --resume must also keep for this data (train.load_resume): streamed tar shards are split by process
    and DataLoader worker (ShardStream), so processes, workers and batch size stay (--cache: nothing)."""
    try:
        streamed = cfg.task in ("t2i", "depth") and not cfg.cache and safe_list_shards(cfg.data) is not None
    except DataError:  # named when the task reads its data
        return []
    was = (saved_world, max(saved.workers or 0, 1), saved.batch_size, saved.grad_accum)
    now = (world, max(cfg.workers, 1), cfg.batch_size, cfg.grad_accum)
    if not streamed or was == now:
        return []
    return ["tar shards streamed by {} process(es) x {} worker(s), batch {} x grad-accum {} (now {} x {}, {} x {})"
            .format(*was, *now)]


# ----------------------------------------------------------------------------- --cache: to disk, in shards

CACHE_ITEMS = 1024  # items per cache shard of a folder (a tar shard's cache shard holds that tar's items)


class CacheWriter:
    """One cache shard, written as it is encoded: each tensor's rows appended to a temp file of its own, then
    one safetensors file (header + the blocks) renamed into place: RAM holds a micro-batch, not the shard.
    `names`: the tensors of an item (t2i's latent and context; depth's x1 and cond)."""
    NAMES = ("latents", "context")

    def __init__(self, path, names=NAMES):
        self.path, self.names, self.files, self.shapes, self.n = path, names, None, None, 0

    def append(self, *tensors):
        if self.files is None:
            self.files = [open(temp_name(self.path.removesuffix(".safetensors") + "." + k), "w+b") for k in self.names]
            self.shapes = [list(t.shape[1:]) for t in tensors]
        for f, t in zip(self.files, tensors):
            f.write(t.detach().float().cpu().contiguous().numpy().tobytes())
        self.n += len(tensors[0])

    def close(self):
        header, offset = {"__metadata__": {"items": str(self.n)}}, 0
        for name, f, shape in zip(self.names, self.files or (), self.shapes or ()):
            header[name] = dict(dtype="F32", shape=[self.n, *shape], data_offsets=[offset, offset + f.tell()])
            offset += f.tell()
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors: the data starts 8-aligned
        with atomic_path(self.path, need=offset) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            for f in self.files or ():
                f.seek(0)
                shutil.copyfileobj(f, out, 1 << 20)
        for f in self.files or ():
            f.close()
            os.remove(f.name)


class CacheDataset(torch.utils.data.Dataset):
    """dataset[i] -> (latent, context) of item i of the cache shards (the tensors `names`), each row one pread:
    only the shards' headers are held, so memory does not grow with the data."""

    def __init__(self, paths, names=CacheWriter.NAMES):
        self.paths, self.names, self.rows, counts = paths, names, [], []
        for p in paths:
            with open(p, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            counts.append(int(header.pop("__metadata__")["items"]))
            self.rows.append({k: (8 + size + v["data_offsets"][0], v["shape"][1:]) for k, v in header.items()})
        self.ends = np.cumsum(counts) if counts else np.zeros(0, np.int64)

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i):
        j = int(np.searchsorted(self.ends, i, side="right"))
        row, fd = i - (int(self.ends[j - 1]) if j else 0), os.open(self.paths[j], os.O_RDONLY)
        try:
            return tuple(self.read(fd, *self.rows[j][k], row) for k in self.names)
        finally:
            os.close(fd)

    @staticmethod
    def read(fd, start, shape, row):
        size = 4 * math.prod(shape)
        return torch.frombuffer(bytearray(os.pread(fd, size, start + row * size)), dtype=torch.float32).view(shape)


class CacheSource(torch.utils.data.IterableDataset):
    """The cache shards `todo` to encode, split over DataLoader workers, as (j, micro-batch) and (j, None) once
    shard j is complete. A folder's shard j: items j C .. (j+1) C - 1 (unreadable ones replaced as in training);
    a tar's: its usable items (the others skipped, named)."""

    def __init__(self, ds, shards, todo, batch_size, resolution):
        self.ds, self.shards, self.todo, self.batch_size, self.resolution = ds, shards, todo, batch_size, resolution

    def records(self, j):
        if self.ds is not None:
            yield from map(self.ds.item, range(j * CACHE_ITEMS, min(len(self.ds), (j + 1) * CACHE_ITEMS)))
            return
        try:
            for key, group in tar_groups(self.shards[j]):
                why = t2i_valid(group)
                yield dict(skipped=[f"{self.shards[j]}: {key}: {why}; skipped"], read=1) if why else \
                    shard_record(self.resolution, self.shards[j], key, group)
        except ShardCut as e:
            yield dict(skipped=[], cut=[str(e)], read=0)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for j in self.todo[info.id::info.num_workers] if info else self.todo:
            records = []
            for r in self.records(j):
                records.append(r)
                if len(records) == self.batch_size:
                    yield j, collate(records, fill=self.ds is not None)
                    records = []
            if records:
                yield j, collate(records, fill=self.ds is not None)
            yield j, None


def cache_key(cfg, ds, shards, **extra):
    """What the cache was made from: data, resolution, model (and its mtime), a digest of the listing, and `extra`
    (depth's: its own listing digest and normalisation)."""
    h = hashlib.sha1()
    if shards:
        for p in shards:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    elif ds is not None:
        h.update(ds.files.tobytes())
        h.update(json.dumps(ds.captions).encode())
    mtime = os.path.getmtime(cfg.ckpt) if os.path.exists(cfg.ckpt) else 0.0
    key = dict(data=cfg.data, resolution=cfg.resolution, ckpt=cfg.ckpt, mtime=mtime, listing=h.hexdigest()) | extra
    return json.loads(json.dumps(key))  # as read back from cache.json (tuples become lists)


def reset_cache(folder, key):
    """Rank 0: a cache made from anything else is removed (said in one line); cache.json gets the key."""
    path = os.path.join(folder, "cache.json")
    try:
        old = json.loads(read_text(path)) if os.path.exists(path) else None
    except (ValueError, DataError):
        old = "damaged"
    if old == key:
        return
    if old is not None:
        print(f"--cache: {folder} was made from other data, model or resolution: encoding again")
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(folder, f))
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(key, f)


def encode_cache(cfg, ds, shards, todo, paths, bundle, env, skips):
    """This process's cache shards `todo`: decoded by the DataLoader workers, encoded here, streamed to disk."""
    if env.device == "cpu":  # glibc keeps the encoders' freed activations otherwise: RSS grew ~2 MB per batch
        return_freed_memory()
    source = CacheSource(ds, shards, todo, cfg.batch_size, cfg.resolution)
    loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=min(cfg.workers, len(todo)))
    writers = {}
    for j, batch in tqdm(loader, desc=f"--cache: encoding {len(todo)} shard(s)", unit="batch", dynamic_ncols=True,
                         disable=not env.master):
        if batch is None:
            (writers.pop(j, None) or CacheWriter(paths[j])).close()
            continue
        skips(batch)
        if "image" in batch:
            z, c = encode(bundle, batch["image"].to(env.device), batch["caption"], env.amp)
            writers.setdefault(j, CacheWriter(paths[j])).append(z, c)


def shared_cache(cfg, key, n, env, encode):
    """The n cache shard paths OUT/cache/NNNNN.safetensors, made from `key` (cache_key): rank 0 removes a cache made
    from anything else, then each process encodes every world-th missing shard, encode(todo, paths), and all wait
    for all (the barriers), so every shard is written once and read by all."""
    folder = os.path.join(cfg.out, "cache")
    paths = [os.path.join(folder, f"{j:05d}.safetensors") for j in range(n)]
    if env.master:
        reset_cache(folder, key)
    if env.world > 1:
        torch.distributed.barrier()
    todo = [j for j in range(env.rank, n, env.world) if not os.path.exists(paths[j])]
    if todo:
        encode(todo, paths)
    if env.world > 1:
        torch.distributed.barrier()
    return paths


def disk_cache(cfg, ds, shards, bundle, env, skips):
    """--cache: every item encoded once (latent means, text embeddings) into OUT/cache/NNNNN.safetensors, one per
    tar shard or per CACHE_ITEMS folder items; each process encodes every world-th missing shard (no item twice),
    then all read all of them, streamed (CacheDataset). Reused while listing, model and resolution are the same;
    a killed run's complete shards are kept. Several nodes: OUT must be a path all of them see (as for ckpt.pt)."""
    paths = shared_cache(cfg, cache_key(cfg, ds, shards), len(shards) if shards else -(-len(ds) // CACHE_ITEMS),
                         env, lambda todo, paths: encode_cache(cfg, ds, shards, todo, paths, bundle, env, skips))
    cache = CacheDataset(paths)
    if not len(cache):
        raise DataError(f"--data {cfg.data}: no usable item to cache")
    return cache


# ----------------------------------------------------------------------------- python data.py check DATA

def check(spec, resolution):
    """Read every caption and decode every image of DATA as training would meet them; print each unusable one."""
    shards, bad, n = list_shards(spec), [], 0
    if shards is None:
        ds = FolderDataset(spec, resolution)
        for i in tqdm(range(len(ds)), desc="checking", unit="image", dynamic_ncols=True):
            try:
                ds[i]
            except Exception as e:
                bad.append(f"{ds.file(i)}: {e}" if isinstance(e, DataError) else
                           f"{ds.file(i)}: unreadable ({type(e).__name__}: {e})")
        n = len(ds)
    for p in tqdm(shards or (), desc="checking", unit="shard", dynamic_ncols=True):
        try:
            for key, group in tar_groups(p):
                n += 1
                why = t2i_valid(group)
                bad += [f"{p}: {key}: {why}"] if why else shard_record(resolution, p, key, group)["skipped"]
        except ShardCut as e:
            bad.append(str(e))
        except tarfile.ReadError as e:
            bad.append(f"{p}: not a tar file ({e})")
    for line in bad:
        print(line)
    if bad:
        fail(f"{spec}: {len(bad)} unusable of {n} items (listed above)")
    print(f"{spec}: all {n} items usable")


def check_args(cfg):
    """train.py's checks of --data (usage errors, before anything is loaded)."""
    if cfg.task != "reflow" and not cfg.data:
        usage_error("--data is required: " + ("a pair folder, rgb/ + depth/ (depth.py)" if cfg.task == "depth" else
                                              "a folder of images with .txt captions, a metadata.jsonl or .tar shards"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="decode every image and read every caption of DATA (a folder or tar shards)")
    c.add_argument("data")
    c.add_argument("--resolution", type=int, default=64, help="decode as training at this size would")
    args = parser.parse_args(argv)
    one_line_warnings()
    try:
        check(args.data, args.resolution)
    except DataError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
