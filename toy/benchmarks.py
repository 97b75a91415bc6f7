"""The zero-shot depth benchmarks of the Diff2Flow paper (NYUv2, KITTI, ETH3D, ScanNet, DIODE), read in the layout
of Marigold's evaluation data (github.com/prs-eth/Marigold, src/dataset/*_dataset.py, config/dataset_depth/) and
scored with its protocol.

    python toy/evaluate.py depth --dataset nyuv2 PATH --ckpt model.safetensors       # --ensemble 4 --steps 10

PATH is the dataset's folder, or Marigold's tar of it (e.g. nyu_labeled_extracted.tar), holding the files that
the split (default: Marigold's list, assets/depth_splits/NAME.txt; --split FILE for another) names, one sample a
line, paths relative to PATH:

    nyuv2    rgb.png depth.png filled.png   654 Eigen test images, 480x640; depth: 16-bit PNG, millimetres (/1000);
             the raw depth is scored (filled: not used); valid 1e-3 < d < 10 m, and Eigen's crop [45:471, 41:601]
    kitti    rgb.png depth.png focal        652 of Eigen's test split with ground truth (lines with depth "None"
             are skipped); depth: 16-bit PNG (/256, 0 = no lidar point); image and depth cut to the KITTI
             benchmark's 352x1216 (bottom, centred); valid 1e-5 < d < 80 m and Eigen's crop (rows 0.3324-0.9135,
             columns 0.0359-0.9641 of the height and width)
    eth3d    rgb.JPG depth.JPG              454 DSLR images, 4032x6048; depth: raw little-endian float32, H x W of the
             image, no header (inf = invalid); valid d > 1e-5 m
    scannet  color.jpg depth.png            800 validation frames, 480x640; depth: 16-bit PNG (/1000); valid 1e-3 < d < 10
    diode    rgb.png depth.npy mask.npy     771 validation images (indoor and outdoor), 768x1024; depth: .npy float32
             metres (H, W, 1); mask: .npy, nonzero = valid; the mask alone says which pixels count (the range
             0.6-350 m only clips the aligned prediction)

The protocol (Marigold's script/depth/eval.py): the model sees the image resized to the processing resolution
(the longer side; the paper's 384x512 for a 4:3 image is --processing-res 512) and its prediction is resized back
to the ground truth's size (depth.predict); least-squares scale and shift on the valid pixels (depth space, as
Marigold; and in log depth, the space our models are affine-invariant in: depth.depth_metrics), the aligned
depth clipped to the range; AbsRel and delta1..3 per image, averaged over the images.
"""
import io
import os
import sys
import tarfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: depth, ...

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from depth import DepthError, depth_metrics, mean_metrics, predict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
SPLITS = os.path.join(ROOT, "assets", "depth_splits")  # Marigold's data_split/ lists (Apache-2.0), one per benchmark
KITTI_BM = (352, 1216)  # the KITTI benchmark's image size (Marigold's kitti_bm_crop)


@dataclass(frozen=True)
class Benchmark:
    name: str
    drange: tuple  # (min, max) metres: valid gt is strictly inside; the aligned prediction is clipped to it
    depth: str  # how depth files are decoded: "png1000", "png256", "float32", "npy"
    crop: str = ""  # evaluation mask: "nyu_eigen", "kitti_eigen" or none
    mask_file: bool = False  # DIODE: a third column names a .npy mask, which alone decides validity
    kitti_bm_crop: bool = False  # KITTI: image and depth cut to 352x1216 first


BENCHMARKS = {b.name: b for b in (
    Benchmark("nyuv2", (1e-3, 10.0), "png1000", crop="nyu_eigen"),
    Benchmark("kitti", (1e-5, 80.0), "png256", crop="kitti_eigen", kitti_bm_crop=True),
    Benchmark("eth3d", (1e-5, float("inf")), "float32"),
    Benchmark("scannet", (1e-3, 10.0), "png1000"),
    Benchmark("diode", (0.6, 350.0), "npy", mask_file=True),
)}


# ----------------------------------------------------------------------------- files: a folder or a tar

class Source:
    """Bytes of files named relative to a dataset folder, or to the root of a tar of it (Marigold ships tars)."""

    def __init__(self, path):
        self.path, self.tar = os.fspath(path), None
        if os.path.isfile(self.path):
            if not tarfile.is_tarfile(self.path):
                raise DepthError(f"{self.path}: neither a dataset folder nor a tar of one")
            self.tar = tarfile.open(self.path)
            self.members = {m.name.removeprefix("./"): m for m in self.tar.getmembers() if m.isfile()}
        elif not os.path.isdir(self.path):
            raise DepthError(f"{self.path}: no such dataset folder or tar")

    def read(self, rel):
        if self.tar is None:
            try:
                with open(os.path.join(self.path, rel), "rb") as f:
                    return f.read()
            except OSError as e:
                raise DepthError(f"{os.path.join(self.path, rel)}: cannot read it ({e.strerror}); is PATH the "
                                 "dataset's root, laid out as its split file says?") from None
        if rel not in self.members:
            raise DepthError(f"{self.path}: holds no {rel}; is it the dataset's tar, laid out as its split says?")
        return self.tar.extractfile(self.members[rel]).read()


def read_split(path):
    """Split file -> list of its lines' columns (paths relative to the dataset root); KITTI's "None" depth dropped."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [line.split() for line in f if line.strip()]
    except OSError as e:
        raise DepthError(f"{path}: cannot read the split file ({e.strerror})") from None
    rows = [r for r in rows if len(r) > 1 and r[1] != "None"]
    if not rows:
        raise DepthError(f"{path}: no 'image depth ...' line in the split file")
    return rows


# ----------------------------------------------------------------------------- decoding and masks

def decode_rgb(data, name):
    """An image file's bytes -> (3, H, W) float32 in [-1, 1], the pixels as stored (no EXIF rotation: the depth
    maps are not rotated either), as Marigold's loaders read them."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (OSError, ValueError) as e:
        raise DepthError(f"{name}: cannot read it as an image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(a).permute(2, 0, 1) / 255.0 * 2 - 1


def decode_depth(data, kind, shape, name):
    """A depth file's bytes -> (H, W) float32 metres, 0 where invalid. shape: the image's (H, W), which the raw
    float32 of ETH3D has no header to say."""
    try:
        if kind == "float32":
            d = np.frombuffer(data, dtype="<f4").copy()
            if d.size != shape[0] * shape[1]:
                raise DepthError(f"{name}: {d.size} float32 values, not the image's {shape[0]} x {shape[1]}")
            d = d.reshape(shape)
        elif kind == "npy":
            d = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32).squeeze()
        else:
            with Image.open(io.BytesIO(data)) as im:
                d = np.asarray(im, dtype=np.float32) / (1000.0 if kind == "png1000" else 256.0)
    except (OSError, ValueError) as e:
        raise DepthError(f"{name}: cannot read depth ({type(e).__name__}: {e})") from None
    if d.shape != tuple(shape):
        raise DepthError(f"{name}: depth {d.shape} and image {tuple(shape)} differ in size")
    return torch.from_numpy(np.where(np.isfinite(d), d, 0).astype(np.float32))  # ETH3D: inf = invalid


def eval_crop(kind, shape):
    """The evaluation region (H, W) bool: NYUv2's Eigen crop (fixed, for 480x640), KITTI's Eigen crop (fractions of
    the 352x1216 benchmark crop, as Marigold and BTS), else everything."""
    H, W = shape
    m = torch.zeros(shape, dtype=torch.bool)
    if kind == "nyu_eigen":
        m[45:471, 41:601] = True
    elif kind == "kitti_eigen":
        m[int(0.3324324 * H):int(0.91351351 * H), int(0.0359477 * W):int(0.96405229 * W)] = True
    else:
        m[:] = True
    return m


def kitti_benchmark_crop(x):
    """(..., H, W) -> (..., 352, 1216): the bottom rows, centred columns (Marigold's kitti_benchmark_crop)."""
    H, W = x.shape[-2:]
    if H < KITTI_BM[0] or W < KITTI_BM[1]:
        raise DepthError(f"a KITTI image of {H}x{W}: smaller than the benchmark's 352x1216")
    top, left = H - KITTI_BM[0], (W - KITTI_BM[1]) // 2
    return x[..., top:top + KITTI_BM[0], left:left + KITTI_BM[1]]


class BenchmarkDataset:
    """Item i -> (image (3, H, W) in [-1, 1], depth (H, W) metres, valid (H, W) bool), as the protocol scores it."""

    def __init__(self, name, root, split=None):
        self.bench = BENCHMARKS[name]
        self.rows = read_split(split or os.path.join(SPLITS, name + ".txt"))
        self.source = Source(root)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        b, row = self.bench, self.rows[i]
        image = decode_rgb(self.source.read(row[0]), row[0])
        gt = decode_depth(self.source.read(row[1]), b.depth, image.shape[1:], row[1])
        if b.kitti_bm_crop:
            image, gt = kitti_benchmark_crop(image), kitti_benchmark_crop(gt)
        if b.mask_file:
            mask = np.load(io.BytesIO(self.source.read(row[2])), allow_pickle=False).squeeze()
            valid = torch.from_numpy(mask.astype(bool)) & (gt > 0)
        else:
            valid = (gt > b.drange[0]) & (gt < b.drange[1])
        return image, gt, valid & eval_crop(b.crop, gt.shape)


# ----------------------------------------------------------------------------- protocol

def image_metrics(pred, gt, valid, bench):
    """One image's metrics, aligned in log depth (our models' space) and in depth ("depth_" keys, Marigold's)."""
    kw = dict(in_range=not bench.mask_file)
    m = depth_metrics(pred, gt, valid, *bench.drange, align="log", **kw)
    d = depth_metrics(pred, gt, valid, *bench.drange, align="depth", **kw)
    return {**m, **{"depth_" + k: v for k, v in d.items()}, "pixels": int(valid.sum())}


def model_predictor(bundle, steps, ensemble, seed=0, res=512):
    """(i, image) -> prediction (H, W) at the image's size: depth.predict at `res` (0: the image's own longer
    side), image i with noise seed + i."""
    context = bundle.encode_prompt([""])
    return lambda i, image: predict(bundle, image, steps, ensemble, seed + i, res or max(image.shape[1:]), context)[0]


def evaluate(ds, predictor, n=None, desc=""):
    """The mean per-image metrics of predictor over the first n items of ds, the count and the seconds per image."""
    rows, seconds = [], 0.0
    for i in tqdm(range(min(n or len(ds), len(ds))), desc=desc or ds.bench.name, dynamic_ncols=True, leave=False):
        image, gt, valid = ds[i]
        if not valid.any():  # Marigold's loaders give every listed image; an empty one is a layout problem
            raise DepthError(f"{ds.rows[i][1]}: no valid ground-truth pixel; is it the {ds.bench.name} file?")
        t0 = time.perf_counter()
        y = predictor(i, image)
        seconds += time.perf_counter() - t0
        rows.append(image_metrics(y, gt, valid, ds.bench))
    return {**mean_metrics(rows), "n": len(rows), "sec_per_image": seconds / len(rows)}


def markdown_table(rows):
    head = ("| model | dataset | steps | ensemble | images | AbsRel | delta1 | AbsRel / delta1, depth-space LS "
            "(Marigold's) | s / image |\n|" + "---|" * 9 + "\n")
    return head + "\n".join(
        f"| {r['model']} | {r['dataset']} | {r['steps']} | {r['ensemble']} | {r['n']} | {r['abs_rel']:.4f} | "
        f"{r['delta1']:.4f} | {r['depth_abs_rel']:.4f} / {r['depth_delta1']:.4f} | {r['sec_per_image']:.2f} |"
        for r in rows)
