"""Image + caption folders for train.py, and the deterministic, resumable order it reads them in.

Two layouts, as in the Hugging Face `imagefolder` convention:
    data/cat.png + data/cat.txt           a caption file beside each image (same name, .txt)
    data/metadata.jsonl                   one {"file_name": "cat.png", "text": "a cat"} per line

Every image is converted to RGB (transparency onto white), its shorter side resized to `resolution`
and center-cropped to a square, then scaled to [-1, 1] as the VAE expects.
"""
import functools
import json
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    """The data cannot be used; the message is one line naming the files and what to do."""


def _names(paths, root, k=5):
    """'a.png, b.png, ... (+3 more)': enough to find the files, short enough for one line."""
    shown = ", ".join(os.path.relpath(p, root) for p in paths[:k])
    return shown + (f", ... (+{len(paths) - k} more)" if len(paths) > k else "")


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
    captions = []
    for p in images:
        with open(os.path.splitext(p)[0] + ".txt", encoding="utf-8") as f:
            captions.append(f.read().strip())
    return images, captions


def read_metadata_jsonl(path):
    """metadata.jsonl lines {"file_name": ..., "text": ...}; file names are relative to its folder."""
    root, images, captions = os.path.dirname(path), [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
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


def _open(path, resolution):
    """Image.open + draft: a JPEG is decoded directly at the smallest 1/2, 1/4, 1/8 scale that still
    covers resolution x resolution, several times faster for large photos."""
    im = Image.open(path)
    im.draft("RGB", (resolution, resolution))
    return im


def _unreadable(path, resolution):
    """Why an image cannot be used, or None. It decodes the pixels: headers alone miss truncated files."""
    try:
        with _open(path, resolution) as im:
            im.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        return f"{type(e).__name__}: {e}"
    return None


def load_image(path, resolution):
    """File -> (3, resolution, resolution) float32 in [-1, 1]: RGB, shorter side resized, center crop."""
    with _open(path, resolution) as im:
        im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
        if im.mode in ("RGBA", "LA", "P", "PA"):  # transparent pixels' colour is arbitrary: use white
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        im = im.convert("RGB")
    scale = resolution / min(im.size)
    w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return x.float() / 127.5 - 1


class FolderDataset(torch.utils.data.Dataset):
    """dataset[i] -> (image (3, R, R) in [-1, 1], caption). Unreadable images are skipped with a warning
    naming them; if half or more are unreadable the data is wrong, not noisy, and it is an error."""

    def __init__(self, path, resolution):
        if resolution < 8 or resolution % 8:
            raise DataError(f"resolution {resolution} must be a positive multiple of 8 (the VAE downsamples by 8)")
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

    def __getitem__(self, i):
        try:
            return load_image(self.files[i], self.resolution), self.captions[i]
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
