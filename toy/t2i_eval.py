"""Text-to-image metrics of the paper's FID row: one image per caption (COCO 2017), sampled with the ODE, then FID
against the real images and the CLIP score of each image to its caption.

    python toy/evaluate.py t2i --prompts captions_val2017.json --real val2017/ --ckpt model.safetensors
    torchrun --nproc_per_node=8 toy/evaluate.py t2i ...          # the sampling sharded by caption index

Captions: a text file (one per line) or COCO's annotations JSON (the first caption of each image, by image id).
Sampling is resumable: OUT/images/NNNNNN.png, image i of caption i with noise seed + i (the same image on any
number of processes); existing files are kept, so a rerun samples only what is missing.

FID (optional dependency clean-fid, `pip install --no-deps clean-fid requests`: it declares torchvision, which
its parts used here do not import): clean-fid's "clean" mode, i.e. its PIL bicubic resize to 299x299 and the
TensorFlow Inception network of the original FID as TorchScript (inception-2015-12-05.pt, read from --inception
or where clean-fid itself saves it); the Frechet distance in closed form (toy/metrics.py; with fewer images than
2048 through their Gram matrices). Real images are centre-cropped to a square and resized to the samples' size
first (bicubic), as text-to-image evaluations on COCO do.

CLIP score (optional dependency transformers): 100 x max(cos(image, caption), 0) averaged over the images, with
transformers' CLIPModel and its processor from a local folder or the Hugging Face cache (--clip, default
openai/clip-vit-large-patch14); nothing is downloaded.
"""
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: sd, sample

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cpu_fast  # noqa: E402
import diff2flow  # noqa: E402
import metrics  # noqa: E402
import sample  # noqa: E402
from common import atomic_path, fail, remove_stale_temps  # noqa: E402

INCEPTION = "inception-2015-12-05.pt"  # the TF-FID Inception as TorchScript (StyleGAN2-ADA's, clean-fid's)
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------- captions

def read_captions(path):
    """captions.txt (one per line, blank lines skipped) or COCO annotations JSON -> list of captions."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            if not path.endswith(".json"):
                return [line.strip() for line in f if line.strip()]
            ann = json.load(f)["annotations"]
    except OSError as e:
        fail(f"cannot read --prompts {path}: {e.strerror}")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        fail(f"--prompts {path}: not a UTF-8 caption file or COCO annotations JSON ({type(e).__name__}: {e})")
    first = {}
    for a in sorted(ann, key=lambda a: a["id"]):  # COCO: five captions per image; the first by annotation id
        first.setdefault(a["image_id"], a["caption"].strip())
    return [first[k] for k in sorted(first)]


# ----------------------------------------------------------------------------- sampling (resumable, sharded)

def image_path(out, i):
    return os.path.join(out, "images", f"{i:06d}.png")


def todo(out, n, rank=0, world=1):
    """This rank's caption indices (i = rank mod world) whose image is not written yet."""
    return [i for i in range(rank, n, world) if not os.path.exists(image_path(out, i))]


@torch.no_grad()
def sample_captions(bundle, captions, out, size, steps, cfg, seed=0, batch=8, rank=0, world=1, sampler="euler"):
    """Write OUT/images/NNNNNN.png for this rank's captions not yet done; image i from noise seed + i."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    remove_stale_temps(os.path.join(out, "images"))
    jobs, device = todo(out, len(captions), rank, world), next(bundle.unet.parameters()).device
    model = diff2flow.velocity_model(bundle.unet, bundle.alphas_cumprod, bundle.prediction, bundle.objective)
    uncond = bundle.encode_prompt([""]) if cfg != 1 else None
    shape = (1, bundle.unet.cfg.out_channels, size[0] // bundle.vae.downsample, size[1] // bundle.vae.downsample)
    for b in tqdm(range(0, len(jobs), batch), desc=f"sampling (rank {rank})", disable=not jobs, dynamic_ncols=True):
        idx = jobs[b:b + batch]
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in idx])
        context = bundle.encode_prompt([captions[i] for i in idx])
        z = sample.SAMPLERS[sampler](model, noise.to(device), steps, context, uncond, cfg)
        for i, img in zip(idx, sample.to_uint8(bundle.vae, z)):
            with atomic_path(image_path(out, i)) as tmp:
                Image.fromarray(img.numpy()).save(tmp, format="PNG")
    return len(jobs)


# ----------------------------------------------------------------------------- FID (clean-fid's features)

def find_inception(path=None):
    """The Inception TorchScript file: --inception, else where clean-fid saves it (the temp folder)."""
    candidates = [path] if path else [os.path.join(tempfile.gettempdir(), INCEPTION),
                                      os.path.expanduser(os.path.join("~", ".cache", "clean-fid", INCEPTION))]
    for c in candidates:
        if os.path.isfile(c):
            if os.path.basename(c) != INCEPTION:
                fail(f"--inception {c}: clean-fid reads the file by its name, {INCEPTION}; rename it")
            return c
    fail(f"FID needs the Inception weights {INCEPTION}: download {INCEPTION_URL} and pass --inception FILE "
         "(or --no-fid)")


def inception(path, device):
    """clean-fid's InceptionV3W on the weights file at path (no download): (B, 3, 299, 299) in [0, 255] -> (B, 2048)."""
    try:
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer
    except ImportError as e:
        fail(f"FID needs clean-fid: pip install --no-deps clean-fid requests ({e}); or --no-fid")
    return InceptionV3W(os.path.dirname(path), download=False).to(device).eval(), build_resizer("clean")


def square(im, size):
    """A real image -> centre square crop, resized (bicubic) to the samples' (H, W)."""
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return im.resize((size[1], size[0]), Image.BICUBIC, box=box)


@torch.no_grad()
def fid_features(paths, net, resize, device, size=None, batch=64, desc="features"):
    """Images -> (N, 2048) float64, as clean-fid's ResizeDataset + get_batch_features ("clean" mode)."""
    feats = []
    for b in tqdm(range(0, len(paths), batch), desc=desc, dynamic_ncols=True, leave=False):
        x = []
        for p in paths[b:b + batch]:
            with Image.open(p) as im:
                im = im.convert("RGB")
                im = square(im, size) if size else im
            x.append(torch.from_numpy(resize(np.asarray(im))).permute(2, 0, 1))  # (3, 299, 299) in [0, 255]
        feats.append(net(torch.stack(x).to(device)).double().cpu())
    return torch.cat(feats)


def frechet_distance(a, b):
    """FD of Gaussians fitted to features a (N, D), b (M, D). With N or M under D, the covariances' product has at
    most min(N, M) nonzero eigenvalues, those of (Xa Xb^T)(Xb Xa^T) / ((N-1)(M-1)) (X: the centred features), whose
    square roots are the singular values of Xa Xb^T: exact and O(N^2 D) instead of two D x D eigendecompositions.
    Singular values, not square roots of eigenvalues: a rounding-level eigenvalue (~1e-16 |G|) of the rank-deficient
    product would add its square root (~1e-8 |Xa Xb^T|) to the trace; a singular value adds ~1e-16 of it."""
    if min(len(a), len(b)) >= a.shape[1]:
        return metrics.frechet_distance(a, b)
    xa, xb = a - a.mean(0), b - b.mean(0)
    cross = torch.linalg.svdvals(xa @ xb.T).sum() / ((len(a) - 1) * (len(b) - 1)) ** 0.5  # (N, M) -> min(N, M)
    tr = (xa ** 2).sum() / (len(a) - 1) + (xb ** 2).sum() / (len(b) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + tr - 2 * cross)


def real_features(real, net, resize, device, size, cache):
    """Features of every image in the folder real (sorted), cached in `cache` for the same files and size."""
    try:
        paths = sorted(os.path.join(real, f) for f in os.listdir(real) if f.lower().endswith(IMAGE_EXTS))
    except OSError as e:
        fail(f"--real {real}: {e.strerror}")
    if len(paths) < 2:
        fail(f"--real {real}: FID needs at least 2 real images ({' '.join(IMAGE_EXTS)}), found {len(paths)}")
    key = {"files": [os.path.basename(p) for p in paths], "size": list(size)}
    if os.path.exists(cache):
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == key:
            return saved["feats"]
    feats = fid_features(paths, net, resize, device, size, desc="real images")
    with atomic_path(cache) as tmp:
        torch.save({"key": key, "feats": feats}, tmp)
    return feats


# ----------------------------------------------------------------------------- CLIP score (transformers)

def load_clip(name, device):
    """transformers' CLIPModel, tokenizer and (PIL) image processor from a folder or the HF cache; no download."""
    try:
        import transformers
    except ImportError:
        fail("the CLIP score needs transformers: pip install transformers (or --no-clip)")
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)  # no torchvision
    try:
        kw = dict(local_files_only=True)
        return (transformers.CLIPModel.from_pretrained(name, **kw).to(device).eval(),
                transformers.CLIPTokenizer.from_pretrained(name, **kw), processor.from_pretrained(name, **kw))
    except OSError:
        repo = name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name) else DEFAULT_CLIP
        fail(f"no CLIP weights at {name} (a folder, or a repo in the Hugging Face cache): huggingface-cli download "
             f"{repo}, then --clip {repo} (or --no-clip)")


def embedding(out):
    """get_*_features' projected embedding: a tensor (transformers 4), or the output's pooler_output (5)."""
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def clip_score(paths, captions, clip, device, batch=64):
    """Mean over images of 100 max(cos(image embedding, caption embedding), 0) (Hessel et al. 2021, torchmetrics)."""
    model, tok, proc = clip
    total = 0.0
    for b in tqdm(range(0, len(paths), batch), desc="CLIP score", dynamic_ncols=True, leave=False):
        images = [Image.open(p).convert("RGB") for p in paths[b:b + batch]]
        pix = proc(images=images, return_tensors="pt")["pixel_values"].to(device)
        ids = tok(captions[b:b + batch], padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        img = torch.nn.functional.normalize(embedding(model.get_image_features(pixel_values=pix)), dim=-1)
        txt = torch.nn.functional.normalize(embedding(model.get_text_features(**ids)), dim=-1)
        total += (100 * (img * txt).sum(-1).clamp(min=0)).sum().item()
    return total / len(paths)


# ----------------------------------------------------------------------------- the command

def distributed(device):
    """(rank, world, device) under torchrun (nanoGPT style), else (0, 1, device)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def evaluate(a):
    """Sample what is missing (this rank's share), then on rank 0: FID and CLIP score -> OUT/metrics.json."""
    captions = read_captions(a.prompts)[:a.n]
    if not captions:
        fail(f"--prompts {a.prompts}: no captions")
    rank, world, a.device = distributed(a.device)
    try:
        res = sample_all(a, captions, rank, world)
        if world > 1:
            dist.barrier()  # every shard written before rank 0 reads them
        return score(a, captions, res) if rank == 0 else None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def sample_all(a, captions, rank, world):
    """This rank's missing images -> the settings that made them (metrics.json's first fields)."""
    bundle = sample.load_model(a, sample.DTYPES[a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")])
    sample.check_model(a, bundle)  # a text-to-image UNet; DDIM only for a diffusion-parameterised one
    if a.device == "cpu":
        cpu_fast.enable(bundle.unet)
    size = sample.image_size(a, bundle, bundle.meta)
    steps = a.steps or int(bundle.meta.get("steps", 25))
    cfg = a.cfg if a.cfg is not None else float(bundle.meta.get("cfg", 7.5))
    made = sample_captions(bundle, captions, a.out, size, steps, cfg, a.seed, a.batch, rank, world, a.sampler)
    return {"model": bundle.name, "images": len(captions), "sampled_by_rank0": made, "steps": steps, "cfg": cfg,
            "sampler": a.sampler, "size": list(size), "seed": a.seed}


def score(a, captions, res):
    """FID against --real and the CLIP score of the images of OUT/images, into res and OUT/metrics.json."""
    paths = [image_path(a.out, i) for i in range(len(captions))]
    if not a.no_fid:
        net, resize = inception(find_inception(a.inception), a.device)
        real = real_features(a.real, net, resize, a.device, res["size"], os.path.join(a.out, "real_features.pt"))
        res["fid"] = frechet_distance(fid_features(paths, net, resize, a.device, desc="samples"), real)
        res["real_images"] = len(real)
    if not a.no_clip:
        res["clip_score"] = clip_score(paths, captions, load_clip(a.clip, a.device), a.device)
    with atomic_path(os.path.join(a.out, "metrics.json")) as tmp, open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))
    return res
