"""Image-to-depth with a Stable Diffusion UNet fine-tuned Marigold-style, trained with Diff2Flow
(arXiv 2506.02221, section on depth), naive FM or the diffusion loss.

    python depth.py photo.jpg more.png some_folder/           # the bundled tiny demo (synthetic rooms, streets)
    python depth.py img.png --ckpt runs/depth/final.safetensors --steps 4 --ensemble 8 --uncertainty

For each input it writes to --out (default out/depth): NAME_depth.png (colour, near = warm), NAME_depth16.png
(16-bit relative depth) and NAME_depth.npy (float32); with --uncertainty also NAME_uncertainty.png.

The model. The UNet takes 8 input channels, the noisy depth latent then the image latent (the image's
VAE latent mean, concatenated along channels); its first conv is the prior's with the weights copied
for the image half and both halves halved (expand_first_conv), so at the start of fine-tuning an image
latent equal to the noisy latent gives exactly the prior's first layer. Text: the empty prompt, encoded
once. It is a flow from noise (t = 0) to the depth latent (t = 1), sampled with Euler steps: by default the
number the model file records (sampler_meta: 1 for a model trained at t = 0 only, as the demo, else 10).

Depth encoding (normalize_depth): log depth, per image mapped to [-1, 1] by its 2% and 98% quantiles over
the valid pixels (Marigold's quantiles; log depth as the Diff2Flow paper: equal relative errors weigh the
same near and far), clipped, invalid pixels set to 1 (far: in our scenes they are sky; the latent loss has
no pixel mask), replicated to 3 channels and VAE-encoded; decoding averages the 3 channels. Or, with
train.py --depth-norm official (the paper recipes), the official code's: depth capped at 120 m, missing
values interpolated, log depth mapped by the 1% and 99% percentiles of all pixels, not clipped; the
checkpoint records it ("depth_norm") and predict() then leaves the decoded values unclipped too. So the model
predicts affine-invariant LOG depth: y = a log(depth) + b for unknown a > 0, b. Or, with --depth-norm marigold
(the bundled demo's), Marigold's own encoding: depth itself by the same quantiles, so y = a depth + b, evaluated
aligned in depth space. Outputs are r = (y + 1) / 2 in [0, 1] (0 = near): `NAME_depth.npy` holds r,
`NAME_depth16.png` holds round(65535 r).

Colour map (colorize): ColorBrewer's "Spectral" by linear interpolation between its 5 stops, near = dark
red, then orange, pale yellow, green, far = blue-violet: SPECTRAL below.

Ensembling (ensemble_median): --ensemble N predictions from different noise; each is aligned to their
pixelwise median by least squares (scale and shift), then the pixelwise median of the aligned members
is the prediction and their standard deviation the uncertainty map.

Data: a folder of pairs (PairDataset), as scenes.py writes it, or several mixed (train.py --data A --data B
--data-weights 0.9,0.1, the paper's Hypersim + Virtual KITTI 2: data.mixture_batches). Training streams them:
DataLoader workers read each pair, resize it to cover --resolution (a side or HxW, e.g. the paper's 384x512),
crop image and depth together (the centre or --crop random), mirror both (--random-flip), normalise the depth,
and the VAE encodes each micro-batch (--cache: all centre crops encoded once to OUT/cache/ shards, then read back):
    DIR/rgb/NAME.png|jpg        the image
    DIR/depth/NAME.png          16-bit, millimetres (0 = invalid)  -- or DIR/depth/NAME.npy, metres (0/nan/inf = invalid)
    DIR/mask/NAME.png           optional: nonzero = valid
Hypersim: render the tone-mapped `scene_cam_XX_final_preview/frame.IIII.tonemap.jpg` to rgb/, and convert
`frame.IIII.depth_meters.hdf5` (distance along the ray) to planar depth, depth * f / sqrt(f^2 + u^2 + v^2)
(u, v pixel offsets from the centre, f = 886.81 px at 1024x768), as .npy metres to depth/. Virtual KITTI 2:
rgb/ from `frames/rgb/Camera_0/rgb_IIIII.jpg`, depth/ from `frames/depth/Camera_0/depth_IIIII.png`, which is
already 16-bit but in CENTIMETRES: multiply by 10, and mark the sky (655.35 m) invalid (0) or in mask/.

Evaluation (depth_metrics, `python toy/evaluate.py depth`): Marigold's protocol: valid = gt valid and inside the
dataset's [min, max] depth; the prediction is aligned by least squares (scale and shift) on the valid
pixels -- in log depth, the space our model is affine-invariant in (scale and shift in depth space, as for
Marigold's affine-invariant depth, is reported beside it: depth_abs_rel, depth_delta1) --, converted to depth,
clipped to [min, max]; then AbsRel, delta1..3 and RMSE per image, averaged over images.
"""
import argparse
import functools
import hashlib
import io
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

import cpu_fast
import diff2flow
import sd
from common import (DefaultsOnce, atomic_path, exclusive_names, fail, one_line_warnings, open_rgb, remove_stale_temps,
                    return_freed_memory, rgb_array, usage_error)
from data import (CACHE_ITEMS, CacheDataset, CacheWriter, ShardCut, ShardStream, Skips, TaskData, augment_keys,
                  batch_indices, batch_positions, cache_key, check_shards, crop_box, list_shards, mirror,
                  mixture_batches, parse_resolution, parse_weights, shared_cache, tar_groups)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(ROOT, "assets", "demo", "depth_tiny.safetensors")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
QUANTILES = (0.02, 0.98)  # Marigold's robust per-image depth range
NORMS = ("ours", "official", "marigold")  # normalize_depth's encodings (train.py --depth-norm)
FAR_PLANE = 120.0  # metres: the official cap (CompVis/diff2flow diff2flow/dataset/depth_preprocessing.py MAX_FAR_PLANE)
# ColorBrewer "Spectral" (as matplotlib's), reversed so that 0 = near = warm
SPECTRAL = np.array([(158, 1, 66), (244, 109, 67), (255, 255, 191), (102, 194, 165), (94, 79, 162)], float)
UNCERTAINTY_WHITE = 0.25  # ensemble std of r shown as white in NAME_uncertainty.png
DEPTH_RANGES = {"scenes": (0.1, 30.0), "hypersim": (1e-3, 65.0), "nyu": (1e-3, 10.0), "kitti": (1e-5, 80.0),
                "vkitti": (1e-5, 80.0)}  # (min, max) metres, as Marigold's evaluation (scenes: ours)


class DepthError(ValueError):
    """A file or folder cannot be used; the message is one line saying what is wrong and what to do."""


# ----------------------------------------------------------------------------- depth <-> latents

def normalize_depth(depth, valid, norm="ours"):
    """Metric depth (B, 1, H, W) and valid mask -> per-image log depth in [-1, 1] by the 2%/98% quantiles
    of the valid pixels; invalid pixels = 1 (far). An image with no valid pixel is all 1.
    norm="official": normalize_depth_official (the mask is not used, as there). norm="marigold": depth itself,
    not its log, by the same quantiles (Marigold's affine-invariant depth: evaluated aligned in depth space)."""
    if norm == "official":
        return torch.stack([normalize_depth_official(d) for d in depth]) if len(depth) else depth.float()
    out = torch.ones_like(depth, dtype=torch.float32)
    for i in range(len(depth)):
        v = valid[i] & (depth[i] > 0) & torch.isfinite(depth[i])
        if not v.any():
            continue
        d = depth[i][v].double() if norm == "marigold" else depth[i][v].double().log()
        lo, hi = torch.quantile(d, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        y = (d - lo) / max(hi - lo, 1e-6) * 2 - 1
        out[i][v] = y.clamp(-1, 1).float()
    return out


def normalize_depth_official(depth):
    """One depth map (..., H, W), metres -> the official encoding (preprocess_depth in CompVis/diff2flow's
    diff2flow/dataset/depth_preprocessing.py): capped at FAR_PLANE, missing values (0, NaN) filled by np.interp
    along the raster order (1e-4 m before the first / after the last valid pixel, as its interpolate_nans),
    log depth mapped to [-1, 1] by its 1% and 99% percentiles over ALL pixels, NOT clipped (the 2% of pixels
    beyond lie outside [-1, 1]). A map with no valid pixel is all 1 (far), as normalize_depth's."""
    d = np.minimum(depth.double().cpu().numpy().reshape(-1), FAR_PLANE)
    bad = ~(d > 0)  # 0 (our files' invalid), negative, NaN; +inf was capped
    if bad.all():
        return torch.ones_like(depth, dtype=torch.float32)
    if bad.any():
        d[bad] = np.interp(np.flatnonzero(bad), np.flatnonzero(~bad), d[~bad], left=1e-4, right=1e-4)
    lo, hi = np.log(np.percentile(d, (1, 99)))
    y = (np.log(d) - lo) / max(hi - lo, 1e-6) * 2 - 1
    return torch.from_numpy(y).reshape(depth.shape).float()


@torch.no_grad()
def encode_depth(vae, y):
    """Normalised depth (B, 1, H, W) in [-1, 1] -> scaled latent means (B, 4, H/f, W/f): as a grey image."""
    return vae.encode(y.expand(-1, 3, -1, -1).to(next(vae.parameters()).dtype)).float()


@torch.no_grad()
def decode_depth(vae, z, clip=True):
    """Latents -> normalised depth (B, 1, H, W): the decoded image's 3 channels averaged, clipped to [-1, 1]
    (clip=False: as decoded, for the official encoding, whose targets are not clipped)."""
    y = vae.decode(z.to(next(vae.parameters()).dtype)).float().mean(1, keepdim=True)
    return y.clamp(-1, 1) if clip else y


# ----------------------------------------------------------------------------- the model

@torch.no_grad()
def expand_first_conv(unet):
    """The prior's UNet -> its depth version (in place, returned): input_blocks.0.0 takes [noisy latent,
    image latent] (2C channels) with weight [W/2, W/2] and the same bias, so conv([x, x]) = conv_prior(x)."""
    old = unet.input_blocks[0][0]
    c = old.in_channels
    new = type(old)(2 * c, old.out_channels, old.kernel_size, padding=old.padding,
                    device=old.weight.device, dtype=old.weight.dtype)
    new.weight.copy_(torch.cat([old.weight, old.weight], 1) / 2)  # (out, 2C, k, k)
    new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    unet.input_blocks[0][0] = new
    unet.cfg = type(unet.cfg)(**{**vars(unet.cfg), "in_channels": 2 * c})  # a copy: presets stay untouched
    return unet


def check_depth_model(bundle, path):
    ucfg = bundle.unet.cfg
    if ucfg.in_channels != 2 * ucfg.out_channels:
        raise DepthError(f"{path}: its UNet takes {ucfg.in_channels} input channels, a depth model takes "
                         f"{2 * ucfg.out_channels}; pass a checkpoint written by train.py --task depth")


# ----------------------------------------------------------------------------- alignment and ensembling

def fit_scale_shift(x, y, valid=None):
    """Least squares a, b minimising sum_valid (a x + b - y)^2, over the last dims: x, y (..., N) -> a, b (...)."""
    w = torch.ones_like(x) if valid is None else valid.to(x.dtype)
    n = w.sum(-1).clamp(min=1)
    mx, my = (w * x).sum(-1) / n, (w * y).sum(-1) / n
    cov = (w * (x - mx[..., None]) * (y - my[..., None])).sum(-1)
    var = (w * (x - mx[..., None]) ** 2).sum(-1)
    a = cov / var.clamp(min=1e-12)  # a constant x: a = 0, b = mean(y)
    return a, my - a * mx


def ensemble_median(members):
    """(E, H, W) predictions -> median (H, W) of the members aligned to their median, and their std."""
    flat = members.flatten(1).double()  # (E, HW)
    ref = flat.median(0).values if len(flat) % 2 else flat.quantile(0.5, dim=0)
    a, b = fit_scale_shift(flat, ref.expand_as(flat))
    aligned = a[:, None] * flat + b[:, None]
    med = aligned.quantile(0.5, dim=0)
    spread = aligned.std(0) if len(flat) > 1 else torch.zeros_like(med)
    return med.view(members.shape[1:]).float(), spread.view(members.shape[1:]).float()


# ----------------------------------------------------------------------------- prediction

def size_multiple(bundle):
    """Pixel sides must be multiples of the VAE's factor x the UNet's downsamplings (16 for the tiny family)."""
    return bundle.vae.downsample * 2 ** (len(bundle.unet.cfg.channel_mult) - 1)


def processing_size(H, W, res, multiple):
    """(h, w): the longer side -> res, aspect kept, each side rounded to a multiple of `multiple`."""
    s = res / max(H, W)
    return (max(multiple, round(H * s / multiple) * multiple), max(multiple, round(W * s / multiple) * multiple))


@torch.no_grad()
def predict(bundle, image, steps=10, ensemble=4, seed=0, res=None, context=None):
    """One image (3, H, W) in [-1, 1] -> (normalised (log) depth (H, W) in [-1, 1], -1 = near, and the
    ensemble's spread (H, W)), computed at res (default: the model's resolution), returned at H x W."""
    H, W = image.shape[1:]
    vae, unet = bundle.vae, bundle.unet
    device = next(unet.parameters()).device
    res = res or max(parse_resolution(bundle.meta.get("resolution", 64)))  # the longer side
    h, w = processing_size(H, W, res, size_multiple(bundle))
    x = F.interpolate(image[None].float(), (h, w), mode="bilinear", antialias=True, align_corners=False)
    cond = vae.encode(x.to(device, next(vae.parameters()).dtype)).float()  # (1, 4, h/f, w/f)
    context = bundle.encode_prompt([""]) if context is None else context
    model = diff2flow.velocity_model(diff2flow.ConcatCond(unet, cond.expand(ensemble, -1, -1, -1)), bundle.alphas_cumprod,
                                     bundle.prediction, bundle.objective)
    noise = torch.randn((ensemble, *cond.shape[1:]), generator=torch.Generator().manual_seed(seed)).to(device)
    z = diff2flow.sample_euler(model, noise, steps, context.expand(ensemble, -1, -1))
    clip = bundle.meta.get("depth_norm", "ours") != "official"  # the encoding it was trained on (train.py records it)
    y, spread = ensemble_median(decode_depth(vae, z, clip)[:, 0].cpu())  # (h, w) each
    up = F.interpolate(torch.stack([y, spread])[None], (H, W), mode="bilinear", align_corners=False)[0]
    return up[0].clamp(-1, 1) if clip else up[0], up[1]


# ----------------------------------------------------------------------------- metrics

def depth_metrics(pred, gt, valid, dmin, dmax, align="log", in_range=True):
    """One image: prediction (H, W) (affine-invariant log depth for align='log', depth for 'depth'), metric
    ground truth and valid mask -> AbsRel, delta1..3, RMSE after least-squares scale-and-shift alignment on
    the valid pixels inside [dmin, dmax], the aligned depth clipped to [dmin, dmax] (Marigold's protocol).
    in_range=False: the mask alone says which pixels count (Marigold's DIODE: its mask files), the range only clips."""
    v = valid & torch.isfinite(gt) & (gt > 0) & (((gt > dmin) & (gt < dmax)) if in_range else True)
    p, g = pred[v].double(), gt[v].double()
    if len(g) == 0:
        raise DepthError("no valid ground-truth pixel inside the dataset's depth range; check --min/--max-depth")
    if align == "log":
        a, b = fit_scale_shift(p, g.log())
        d = (a * p + b).exp()
    elif align == "depth":
        a, b = fit_scale_shift(p, g)
        d = a * p + b
    else:
        raise ValueError(f"align must be 'log' or 'depth', got {align!r}")
    d = d.clamp(dmin, dmax)
    ratio = torch.maximum(d / g, g / d)
    out = {"abs_rel": ((d - g).abs() / g).mean(), "rmse": ((d - g) ** 2).mean().sqrt()}
    out.update({f"delta{k}": (ratio < 1.25 ** k).double().mean() for k in (1, 2, 3)})
    return {k: float(x) for k, x in out.items()}


def mean_metrics(rows):
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


# ----------------------------------------------------------------------------- files

def read_image(path):
    """Any image file (RGB, RGBA onto white, grey, 16-bit grey, palette) -> (3, H, W) float32 in [-1, 1]."""
    try:
        a = rgb_array(open_rgb(path))
    except (OSError, SyntaxError, ValueError) as e:
        raise DepthError(f"{path}: cannot read it as an image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(a.clip(0, 1)).permute(2, 0, 1).float() * 2 - 1


def read_depth(path, raw=None):
    """depth/NAME.png (16-bit millimetres) or .npy (metres) -> (H, W) float32 metres; 0 where invalid. raw: the
    file's bytes (a tar member; `path` then names it)."""
    src = io.BytesIO(raw) if raw is not None else path
    try:
        if path.endswith(".npy"):
            d = np.load(src, allow_pickle=False).astype(np.float32)
        else:
            with Image.open(src) as im:
                d = np.asarray(im, dtype=np.float32)
                if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                    raise DepthError(f"{path}: a {im.mode} PNG; depth PNGs must be 16-bit millimetres")
                d = d / 1000.0
    except (OSError, ValueError) as e:
        raise DepthError(f"{path}: cannot read depth ({type(e).__name__}: {e})") from None
    d = np.squeeze(d)
    if d.ndim != 2:
        raise DepthError(f"{path}: depth must be one channel (H, W), got shape {d.shape}")
    return torch.from_numpy(np.where(np.isfinite(d) & (d > 0), d, 0).astype(np.float32))


class PairDataset:
    """A pair folder (module docstring): item i -> (image (3, H, W) in [-1, 1], depth (H, W) metres,
    valid (H, W) bool), at the files' own size. Start-up costs two listings; the names are kept as numpy string
    arrays, no Python object per pair (whose refcounts forked DataLoader workers would copy on write)."""

    def __init__(self, root):
        self.root = os.fspath(root)
        rgb = os.path.join(self.root, "rgb")
        if not os.path.isdir(rgb) or not os.path.isdir(os.path.join(self.root, "depth")):
            raise DepthError(f"{self.root}: not a pair folder: it needs rgb/ and depth/ (python toy/scenes.py --out "
                             "DIR writes one)")
        names = sorted(f for f in os.listdir(rgb) if f.lower().endswith(IMAGE_EXTS))
        depth_names = set(os.listdir(os.path.join(self.root, "depth")))  # one listing, not a stat per pair
        stems = [f.rpartition(".")[0] for f in names]
        depth = [s + ".png" if s + ".png" in depth_names else s + ".npy" if s + ".npy" in depth_names else None
                 for s in stems]
        missing = [f for f, d in zip(names, depth) if d is None]
        if missing:
            raise DepthError(f"{self.root}: {len(missing)} images have no depth/NAME.png or .npy: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if not names:
            raise DepthError(f"{self.root}: rgb/ holds no images ({' '.join(IMAGE_EXTS)})")
        self.rgb, self.depth = np.array(names), np.array(depth)

    @property
    def items(self):
        """(rgb path, depth path) of every pair."""
        return [self.paths(i) for i in range(len(self))]

    def paths(self, i):
        return os.path.join(self.root, "rgb", str(self.rgb[i])), os.path.join(self.root, "depth", str(self.depth[i]))

    def __len__(self):
        return len(self.rgb)

    def __getitem__(self, i):
        rgb_path, depth_path = self.paths(i)
        image, depth = read_image(rgb_path), read_depth(depth_path)
        if image.shape[1:] != depth.shape:
            h, w = image.shape[1:]
            raise DepthError(f"{rgb_path}: the image is {h}x{w} but its depth {depth_path} is {depth.shape[0]}x"
                             f"{depth.shape[1]} (HxW); write the depth map at the image's size (or resize both)")
        valid = depth > 0
        mask = os.path.join(self.root, "mask", os.path.splitext(os.path.basename(rgb_path))[0] + ".png")
        if os.path.isfile(mask):
            with Image.open(mask) as m:
                valid &= torch.from_numpy(np.asarray(m.convert("L")) > 0)
        return image, depth, valid


def fit(x, size, mode, crop=None, flip=False):
    """(C, H, W) -> (C, h, w), size = (h, w): resized (aspect kept) to cover it, cropped (data.crop_box: the
    centre, or where `crop` puts it), mirrored left-right if `flip`; nearest for depth and masks (no blends)."""
    (H, W), (h, w) = x.shape[1:], size
    s = max(h / H, w / W)
    rh, rw = max(h, round(H * s)), max(w, round(W * s))
    kw = dict(mode="bilinear", antialias=True, align_corners=False) if mode == "bilinear" else dict(mode="nearest")
    y = F.interpolate(x[None].float(), (rh, rw), **kw)[0]
    left, top = crop_box(rw, rh, w, h, crop)
    y = y[:, top:top + h, left:left + w]
    return y.flip(-1) if flip else y


def square(x, resolution, mode):
    """(C, H, W) -> (C, R, R): shorter side resized to R, centre crop (nearest for depth and masks)."""
    return fit(x, (resolution, resolution), mode)


class TrainItems(torch.utils.data.Dataset):
    """The training items of one or several pair folders at `size` (H, W): key ((source, i), crop, flip), as
    data.augment_keys makes them -> (image (3, H, W) in [-1, 1], normalised log depth (1, H, W)), the image and
    its depth (and mask) cropped and mirrored together. Read and normalised here (DataLoader workers); the
    VAE encodes them per micro-batch."""

    def __init__(self, sources, size, norm="ours"):
        self.sources, self.size, self.norm = sources, size, norm

    def __len__(self):
        return sum(map(len, self.sources))

    def __getitem__(self, key):
        (source, i), crop, flip = key
        return train_item(*self.sources[source][i], self.size, crop, flip, self.norm)


def train_item(image, d, valid, size, crop=None, flip=False, norm="ours"):
    """A pair at its own size -> (image (3, H, W), normalised log depth (1, H, W)) at size (H, W): both resized
    to cover it and cropped and mirrored alike (fit), then the depth normalised over its valid pixels."""
    image = fit(image, size, "bilinear", crop, flip)
    d, valid = fit(d[None], size, "nearest", crop, flip), fit(valid[None], size, "nearest", crop, flip)
    return image, normalize_depth(d[None], valid[None] > 0.5, norm)[0]


# Depth tar shards, read by data.py's generic reader (tar_groups, ShardStream) as t2i's are: members grouped by
# key (up to the file name's first dot), KEY.rgb.* the image and KEY.depth.png (16-bit mm) or .npy (m) its depth.
DEPTH_SHARDS = "KEY.rgb.png|jpg|jpeg|webp + KEY.depth.png (16-bit mm) or KEY.depth.npy (metres) per pair"
RGB_SUFFIXES = ("rgb.png", "rgb.jpg", "rgb.jpeg", "rgb.webp")


def depth_valid(group):
    """Why a shard's group is no depth pair (None: it is one)."""
    if not any(s in group for s in RGB_SUFFIXES):
        return "no KEY.rgb.png|jpg|jpeg|webp"
    return None if "depth.png" in group or "depth.npy" in group else "no KEY.depth.png or KEY.depth.npy"


def shard_pair(size, shard, key, group, norm="ours"):
    """A depth group -> a record for data.collate: "image" (3, H, W) and "depth" (1, H, W), the normalised log
    depth, both centre-cropped to size (H, W) together (train_item)."""
    rgb, dep = next(s for s in RGB_SUFFIXES if s in group), "depth.npy" if "depth.npy" in group else "depth.png"
    try:
        image, d = read_image(io.BytesIO(group[rgb])), read_depth(f"{shard}:{key}.{dep}", group[dep])
    except DepthError as e:  # a damaged member: skipped and named, as a t2i shard's
        return dict(skipped=[f"{shard}: {key}: {e}; skipped"], read=1)
    if image.shape[1:] != d.shape:
        return dict(error=f"{shard}: {key}: the image is {image.shape[1]}x{image.shape[2]} but its depth is "
                          f"{d.shape[0]}x{d.shape[1]} (HxW); write the depth map at the image's size",
                    skipped=[], read=1)
    image, y = train_item(image, d, d > 0, size, norm=norm)
    return dict(image=image, depth=y, skipped=[], read=1)


@torch.no_grad()
def encode_items(bundle, images, y, amp):
    """A micro-batch: images (B, 3, H, W), normalised depth (B, 1, H, W) -> depth latents x1 and image latents
    cond, (B, 4, H/f, W/f) each, on the VAE's device."""
    p = next(bundle.vae.parameters())
    with amp():
        return encode_depth(bundle.vae, y.to(p.device)), bundle.vae.encode(images.to(p.device, p.dtype)).float()


def worker_error(e):
    """A DepthError raised in a DataLoader worker carries the worker's traceback: its last line is the message."""
    last = str(e).strip().splitlines()[-1]
    return last.partition(": ")[2] if last.split(":")[0].endswith("DepthError") else last


CACHE_NAMES = ("x1", "cond")  # an item of a depth cache shard: its depth latent and image latent


class CachedItems(torch.utils.data.Dataset):
    """TrainItems keys ((source, i), crop, flip) -> (x1 (4, h, w), cond (4, h, w)) of item i of source's
    data.CacheDataset: one pread each, nothing held but the shards' headers (--cache takes no crop or flip)."""

    def __init__(self, caches):
        self.caches = caches

    def __len__(self):
        return sum(map(len, self.caches))

    def __getitem__(self, key):
        (source, i), _, _ = key
        return self.caches[source][i]


def cache_shards(sizes):
    """The cache shards of pair folders of `sizes`, CACHE_ITEMS pairs each, numbered on across the sources ->
    [(source, first, end)]."""
    return [(s, lo, min(n, lo + CACHE_ITEMS)) for s, n in enumerate(sizes) for lo in range(0, n, CACHE_ITEMS)]


def shard_batches(shards, todo, batch):
    """The micro-batches of the cache shards `todo`, made as they are read (nothing per pair is held) ->
    (shard, its last?, TrainItems keys of the centre crops)."""
    for j in todo:
        s, lo, hi = shards[j]
        for b in range(lo, hi, batch):
            yield j, b + batch >= hi, [((s, i), None, False) for i in range(b, min(b + batch, hi))]


@torch.no_grad()
def encode_cache(cfg, bundle, env, items, shards, todo, paths):
    """This process's cache shards `todo`: their pairs read and centre-cropped by DataLoader workers (TrainItems),
    VAE-encoded here per micro-batch, each shard's x1 and cond streamed to disk (data.CacheWriter)."""
    if env.device == "cpu":  # glibc keeps the encoder's freed activations otherwise (as data.encode_cache)
        return_freed_memory()
    plan = functools.partial(shard_batches, shards, todo, cfg.batch_size)
    loader = torch.utils.data.DataLoader(items, batch_sampler=(keys for _, _, keys in plan()), num_workers=cfg.workers)
    n = sum(-(-(shards[j][2] - shards[j][1]) // cfg.batch_size) for j in todo)
    writers = {}
    try:
        for (j, last, _), (images, y) in zip(plan(), tqdm(loader, desc=f"--cache: encoding {len(todo)} shard(s)",
                                                           total=n, unit="batch", dynamic_ncols=True,
                                                           disable=not env.master)):
            x1, cond = encode_items(bundle, images, y, env.amp)
            writers.setdefault(j, CacheWriter(paths[j], CACHE_NAMES)).append(x1, cond)
            if last:
                writers.pop(j).close()
    except DepthError as e:
        fail(worker_error(e))


def disk_cache(cfg, bundle, env, sources, items):
    """--cache: every pair encoded once (centre crop: x1, cond) into OUT/cache/NNNNN.safetensors, CACHE_ITEMS
    pairs a file, the sources' files numbered on; made and shared by the processes as t2i's (data.shared_cache),
    reused while the listings, model, resolution and --depth-norm are the same -> one CacheDataset per source."""
    h = hashlib.sha1()
    for ds in sources:
        h.update(f"{ds.root}\0".encode() + ds.rgb.tobytes() + ds.depth.tobytes())
    key = cache_key(cfg, None, None, listing=h.hexdigest(), depth_norm=cfg.depth_norm)
    shards = cache_shards([len(ds) for ds in sources])
    paths = shared_cache(cfg, key, len(shards), env,
                         lambda todo, paths: encode_cache(cfg, bundle, env, items, shards, todo, paths))
    return [CacheDataset([p for p, (s, _, _) in zip(paths, shards) if s == k], CACHE_NAMES)
            for k in range(len(sources))]


def item_keys(cfg, sizes, position, env):
    """This process's micro-batches as TrainItems keys from stream position `position`: one folder in
    data.batch_indices' order, several by data.mixture_batches (--data-weights, else their sizes)."""
    if len(sizes) == 1:
        batches = ([(0, i) for i in idx] for idx in batch_indices(cfg, sizes[0], position, env.rank, env.world))
    else:
        weights = parse_weights(cfg.data_weights, len(sizes)) or sizes
        batches = mixture_batches(cfg, sizes, weights, position, env.rank, env.world)
    return map(functools.partial(augment_keys, cfg), batches, batch_positions(cfg, position, env.rank, env.world))


def task(cfg, bundle, env):
    """--task depth: (image, depth) pairs from --data (PairDataset; several folders mixed), x1 = the depth latent,
    cond = the image latent, context = the empty prompt. Streamed: read, cropped (--crop), mirrored
    (--random-flip) by DataLoader workers and VAE-encoded per micro-batch; --cache: all encoded once to disk
    shards (disk_cache), then read per micro-batch (CachedItems). The prior's UNet gets its first conv widened
    to take both (expand_first_conv); a depth model given as --ckpt is trained on as it is."""
    ucfg = bundle.unet.cfg
    if ucfg.in_channels == ucfg.out_channels:
        expand_first_conv(bundle.unet)
    check_depth_model(bundle, cfg.ckpt)
    empty = bundle.encode_prompt([""]).float().to(env.device)  # (1, 77, width), the only text
    shards = list_shards(cfg.data) if isinstance(cfg.data, str) else None
    if shards is not None:
        return shard_task(cfg, bundle, env, shards, empty)
    sources = [PairDataset(d) for d in (cfg.data if isinstance(cfg.data, list) else [cfg.data])]
    sizes, size = [len(ds) for ds in sources], parse_resolution(cfg.resolution)
    items = TrainItems(sources, size, cfg.depth_norm)
    cached = CachedItems(disk_cache(cfg, bundle, env, sources, items)) if cfg.cache else None

    def batches(position):
        keys = item_keys(cfg, sizes, position, env)
        loader = torch.utils.data.DataLoader(items if cached is None else cached, batch_sampler=keys,
                                             num_workers=cfg.workers, generator=torch.Generator(),
                                             pin_memory=env.device.startswith("cuda"))
        try:
            for a, b in loader:  # cached: (x1, cond); else (images, normalised depth), encoded now
                x1, cond = (a.to(env.device), b.to(env.device)) if cached is not None else \
                    encode_items(bundle, a, b, env.amp)
                yield {"x1": x1, "cond": cond, "context": empty.expand(len(x1), -1, -1)}
        except DepthError as e:
            fail(worker_error(e))

    first = [items[((0, i), None, False)] for i in range(min(4, sizes[0]))]  # the grid's pairs, centre crops
    gx1, gcond = encode_items(bundle, *map(torch.stack, zip(*first)), env.amp)

    def grid(unet, objective, path):  # the first 4 pairs: image, target, prediction
        sample_grid(bundle, unet, objective, gx1, gcond, empty, path, env.amp)
    return TaskData(sum(sizes), batches, [""], grid, "depth pairs" + (" (cached)" if cfg.cache else ""),
                    meta=sampler_meta(cfg))


def sampler_meta(cfg):
    """The steps and ensemble depth.py uses by default, recorded in the model file: 1 step for a model trained at
    t = 0 only (--t-sampling noise_end), whose one Euler step is the prediction it learned; else 10."""
    return dict(steps=1 if cfg.t_sampling == "noise_end" else 10, ensemble=4, depth_norm=cfg.depth_norm,
                t_sampling=cfg.t_sampling)


def first_shard_pairs(shards, size, norm, k=4):
    """Up to k pairs from the first shard, images (k, 3, H, W) and depth (k, 1, H, W): the sample grid's."""
    out = []
    try:
        for key, group in tar_groups(shards[0]):
            record = {} if depth_valid(group) else shard_pair(size, shards[0], key, group, norm)
            out += [(record["image"], record["depth"])] if "image" in record else []
            if len(out) == k:
                break
    except ShardCut:  # named when training reads it
        pass
    if not out:
        raise DepthError(f"{shards[0]}: no usable pair among its first members; shards need {DEPTH_SHARDS}")
    return tuple(map(torch.stack, zip(*out)))


def shard_task(cfg, bundle, env, shards, empty):
    """--task depth on tar shards (DEPTH_SHARDS): split over ranks and workers and resumed by data.ShardStream as
    t2i's shards are; each item shard_pair's image + normalised depth, mirrored here (--random-flip: both by the
    same draws), VAE-encoded per micro-batch. Damaged members and cut shards are skipped, named and counted."""
    if cfg.cache:
        raise DepthError(f"--cache: depth tar shards ({cfg.data}) are streamed; use --no-cache")
    check_shards(shards[env.rank::env.world], depth_valid, DEPTH_SHARDS)
    size, skips = parse_resolution(cfg.resolution), Skips(cfg.data)
    record = functools.partial(shard_pair, size, norm=cfg.depth_norm)

    def batches(position):
        positions = batch_positions(cfg, position, env.rank, env.world)
        start = position // (cfg.batch_size * cfg.grad_accum * env.world) * cfg.grad_accum  # micro-batches done
        stream = ShardStream(shards, cfg.seed, cfg.batch_size, env.rank, env.world, cfg.workers, start, record,
                             depth_valid)
        micro = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                            generator=torch.Generator(), pin_memory=env.device.startswith("cuda"))
        for b, where in zip(map(skips, micro), positions):
            images, y = mirror(cfg, b["image"], where), mirror(cfg, b["depth"], where)
            x1, cond = encode_items(bundle, images, y, env.amp)
            yield {"x1": x1, "cond": cond, "context": empty.expand(len(x1), -1, -1)}
    gx1, gcond = encode_items(bundle, *first_shard_pairs(shards, size, cfg.depth_norm), env.amp)

    def grid(unet, objective, path):
        sample_grid(bundle, unet, objective, gx1, gcond, empty, path, env.amp)
    return TaskData(len(shards), batches, [""], grid, "depth tar shards (streamed)",
                    meta=sampler_meta(cfg),
                    counts=skips.counts)


# ----------------------------------------------------------------------------- pictures

def colorize(r):
    """Relative depth (H, W) in [0, 1], 0 = near -> RGB uint8 (H, W, 3) by the SPECTRAL ramp (near = red)."""
    x = np.clip(np.asarray(r, dtype=np.float64), 0, 1) * (len(SPECTRAL) - 1)
    i = np.minimum(np.floor(x).astype(int), len(SPECTRAL) - 2)  # segment index; x = 1 ends the last one
    w = (x - i)[..., None]
    return np.round((1 - w) * SPECTRAL[i] + w * SPECTRAL[i + 1]).astype(np.uint8)


def save_png(array, path, info=None):
    """Atomically (temp file + rename), with text metadata."""
    png = PngInfo()
    for k, v in (info or {}).items():
        png.add_text(k, str(v))
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, pnginfo=png)


OUTPUTS = ("_depth.png", "_depth16.png", "_depth.npy", "_uncertainty.png")  # after NAME


def output_stems(paths):
    """Each input's NAME: its stem; where stems clash (a/img.png, b/img.png, c/img.jpg) the path below those
    inputs' common folder, subfolders mirrored (a/img, b/img, c/img), and if that still clashes (x.png, x.jpg)
    the extension kept too (x_png, x_jpg)."""
    stem = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    clash = [os.path.abspath(p) for p, s in zip(paths, stem) if stem.count(s) > 1]
    top = os.path.commonpath([os.path.dirname(p) for p in clash]) if clash else ""
    names = [os.path.splitext(os.path.relpath(os.path.abspath(p), top))[0] if stem.count(s) > 1 else s
             for p, s in zip(paths, stem)]
    return [n + "_" + os.path.splitext(p)[1].lstrip(".") if names.count(n) > 1 else n for p, n in zip(paths, names)]


def reserve_outputs(out, name, uncertainty):
    """OUT/NAME_depth.png ... created empty here (O_EXCL), or NAME-1_..., NAME-2_... where an earlier run (or
    another depth.py at the same time) has them: nothing is overwritten."""
    ends = OUTPUTS if uncertainty else OUTPUTS[:3]
    return exclusive_names(out, lambda i: [f"{name}{f'-{i}' if i else ''}{e}" for e in ends])


def write_outputs(paths, y, spread, info):
    """y (H, W) normalised (log) depth in [-1, 1] -> NAME_depth.png (colour), NAME_depth16.png, NAME_depth.npy
    (and NAME_uncertainty.png if `paths` has a 4th), into reserve_outputs' `paths`."""
    r = ((y.numpy() + 1) / 2).clip(0, 1).astype(np.float32)  # relative (log) depth, 0 = near
    save_png(colorize(r), paths[0], info)
    save_png(np.round(r * 65535).astype(np.uint16), paths[1], info)
    with atomic_path(paths[2]) as tmp:
        np.save(tmp, r)
    if len(paths) > 3:  # the ensemble's std in units of r on a grey ramp: 0 black, UNCERTAINTY_WHITE and up white
        u = (spread.numpy() / 2 / UNCERTAINTY_WHITE).clip(0, 1)
        save_png(np.round(u * 255).astype(np.uint8), paths[-1], {**info, "scale": f"grey = std of r / {UNCERTAINTY_WHITE}"})
    return paths


@torch.no_grad()
def sample_grid(bundle, unet, objective, x1, cond, context, path, amp, steps=4):
    """train.py's progress picture: rows image / target depth (VAE-decoded) / prediction, fixed noise."""
    model = diff2flow.velocity_model(diff2flow.ConcatCond(unet, cond), bundle.alphas_cumprod, bundle.prediction,
                                     objective)
    noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(0)).to(x1.device)
    unet.eval()
    with amp():
        z = diff2flow.sample_euler(model, noise, steps, context.expand(len(x1), -1, -1))
        image = bundle.vae.decode(cond.to(next(bundle.vae.parameters()).dtype)).float().clamp(-1, 1)
        target, pred = decode_depth(bundle.vae, x1), decode_depth(bundle.vae, z)
    unet.train()
    row = lambda t: torch.cat(list(t), -1)  # (N, C, H, W) -> (C, H, N*W)
    rgb = ((row(image) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    grid = np.concatenate([rgb] + [colorize((row(d)[0].cpu().numpy() + 1) / 2) for d in (target, pred)], 0)
    save_png(grid, path, {"rows": "image, target, prediction", "steps": steps})


# ----------------------------------------------------------------------------- command line

def load_model(ckpt, device="cpu"):
    """A depth checkpoint (default: the bundled demo) -> SD bundle; one-line errors."""
    if not ckpt and not os.path.exists(DEMO):
        fail(f"no --ckpt given and the demo {os.path.relpath(DEMO)} is missing; pass --ckpt with a model from "
             "train.py --task depth (or make the demo: toy/make_depth_demo.sh)")
    try:
        bundle = sd.load(ckpt or DEMO, device=device)
        check_depth_model(bundle, ckpt or DEMO)
    except (sd.LoadError, DepthError, OSError) as e:
        fail(str(e))
    if device == "cpu":  # inference only: the CPU fast paths (cpu_fast.py)
        cpu_fast.enable(bundle.unet)
    return bundle


def list_inputs(paths):
    """Files as given, folders -> their images (sorted, not recursive). Missing paths are kept: they fail
    one by one with a clear message while the others are processed."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS))
            if not found:
                warnings.warn(f"{p}: no images ({' '.join(IMAGE_EXTS)}) in this folder")
            out += found
        else:
            out.append(p)
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsOnce)
    p.add_argument("inputs", nargs="+", help="images (PNG/JPEG, RGB/RGBA/grey/16-bit) or folders of images")
    p.add_argument("--ckpt", help="a depth model from train.py --task depth (default: the bundled tiny demo)")
    p.add_argument("--steps", type=int, help="Euler steps per prediction (default: the model's, from its training: "
                   "1 for --t-sampling noise_end, else 10)")
    p.add_argument("--ensemble", type=int, help="predictions per image (different noise), median-combined "
                   "(default: the model's, 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the same for every image)")
    p.add_argument("--processing-res", type=int, help="longer side the model sees, in pixels (default: the "
                   "model's training resolution); the outputs have the input's size")
    p.add_argument("--out", default=os.path.join("out", "depth"), help="output folder")
    p.add_argument("--uncertainty", action="store_true", help="also write NAME_uncertainty.png (ensemble std)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = 1 on CPU: the tiny model is "
                   "many small ops, where more threads on a busy machine are slower)")
    return p


def check_args(a):
    for name in ("steps", "ensemble"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            usage_error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.processing_res is not None and a.processing_res < 16:
        usage_error(f"--processing-res must be >= 16, got {a.processing_res}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        usage_error(f"--device {a.device}: CUDA is not available here; use --device cpu")


def main(argv=None):
    one_line_warnings()
    a = build_parser().parse_args(argv)
    check_args(a)
    torch.set_num_threads(a.threads or (1 if a.device == "cpu" else torch.get_num_threads()))
    bundle = load_model(a.ckpt, a.device)
    a.steps, a.ensemble = (getattr(a, k) or int(bundle.meta.get(k, v)) for k, v in (("steps", 10), ("ensemble", 4)))
    context = bundle.encode_prompt([""])
    os.makedirs(a.out, exist_ok=True)
    remove_stale_temps(a.out)  # the temp files of killed writers (dead pids only)
    res = a.processing_res or max(parse_resolution(bundle.meta.get("resolution", 64)))
    info = {"model": bundle.name, "objective": bundle.objective, "steps": a.steps, "ensemble": a.ensemble,
            "seed": a.seed, "processing_res": res, "depth": "relative log depth r in [0, 1], 0 = near",
            "colormap": "Spectral, near = red"}
    written, failed = [], []
    inputs = list_inputs(a.inputs)
    for path, name in zip(bar := tqdm(inputs, desc="depth", unit="image", dynamic_ncols=True), output_stems(inputs)):
        try:
            image = read_image(path)
        except DepthError as e:
            tqdm.write(f"depth.py: error: {e}; skipped")
            failed.append(path)
            continue
        y, spread = predict(bundle, image.to(a.device), a.steps, a.ensemble, a.seed, res, context)
        paths = reserve_outputs(a.out, name, a.uncertainty)
        written += write_outputs(paths, y, spread, {**info, "source": os.path.abspath(path)})
        bar.set_postfix(last=name)
    print(f"wrote {len(written)} files to {a.out}" + (f"; {len(failed)} input(s) failed: {', '.join(failed)}"
                                                      if failed else ""))
    if failed:
        raise SystemExit(1)
    return written


if __name__ == "__main__":
    main()
