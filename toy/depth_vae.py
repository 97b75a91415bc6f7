"""Tune the tiny VAE for depth: the one step of the toy depth recipe that is not Marigold's, and why.

Marigold (and Diff2Flow's depth task) keep Stable Diffusion's VAE frozen: trained on billions of images, it encodes
a photo, and a depth map drawn as a grey image, almost losslessly. Our tiny VAE (toy/pretrain.py) saw only
flat-coloured shapes: decode(encode(depth)) alone, the best any depth model could do, is at AbsRel 0.175 (delta1
0.77) on held-out scenes.py rooms and 0.137 (0.82) on toy/rooms_sdf.py scenes (128 each, 64 px, Marigold's encoding
and depth-space alignment), and a 64 px room comes back at 14.5 dB PSNR.

--part decoder (toy/make_depth_demo.sh --compare's) tunes the decoder (with post_quant_conv) to invert the FROZEN
encoder on depth maps: the latent space the UNet is trained on and predicts stays the prior's, only the way back to
pixels improves (400 steps: the floor falls to 0.021 / 0.989 and 0.027 / 0.982). It reads no UNet, so it runs after
(or while) train.py trains the depth model:

    python toy/depth_vae.py --part decoder --ckpt runs/depth/final.safetensors \
        --data runs/data/scenes-v3-64px-seed0-n8192 --out runs/depth/with_decoder.safetensors

--part all (the demo's, toy/make_depth_demo.sh) tunes encoder and decoder BEFORE the UNet is trained, on both what the UNet reads (the RGB image: L1 +
MSE) and what it predicts (the depth map: L1 of the decoded channel mean, what depth.decode_depth reads), from the
prior's VAE, whose latent scale it keeps (the tuned latents' std stays 1.0); train.py --task depth then trains from
the file it writes (--ckpt). 250 steps of 16 pairs (7 min): RGB 14.5 -> 25.3 dB PSNR, depth L1 0.135 -> 0.023
on the first 64 training pairs (v3 scenes). The UNet then reads a faithful image latent, where the prior's encoder, trained on
flat shapes, kept little of a textured room.

    python toy/depth_vae.py --ckpt assets/demo/prior_tiny.safetensors --data runs/data/scenes-v3-64px-seed0-n8192 \
        --out runs/depth-vae/prior.safetensors
    python toy/depth_vae.py --ckpt runs/depth/final.safetensors --from runs/depth-vae/prior.safetensors \
        --base ../../assets/demo/prior_tiny.safetensors --out runs/depth/small.safetensors   # UNet + that VAE

Batches are training pairs read from disk with random crops and flips (train.py's --crop random --random-flip),
AdamW with linear warmup and cosine decay to 10%. The file written is the model with the new VAE: UNet-only over
--base (or the model's own base) with sd.save(..., own_vae=--part), else the whole bundle.
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: sd, depth

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
import sd  # noqa: E402
from data import parse_resolution, stream_indices  # noqa: E402
from depth import NORMS, PairDataset, decode_depth, encode_depth, train_item  # noqa: E402

N_FLOOR = 64  # pairs (centre crops) the before / after reconstruction is measured on


def batch(ds, cfg, step, size, norm):
    """The step's pairs, each randomly cropped and mirrored (seeded): images (B, 3, H, W) and normalised depth
    (B, 1, H, W)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    out = []
    for i in stream_indices(len(ds), cfg.seed, step * cfg.batch_size, cfg.batch_size):
        crop, flip = torch.rand(2, generator=g).tolist(), bool(torch.rand(1, generator=g) < 0.5)
        out.append(train_item(*ds[i], size, crop, flip, norm))
    return torch.stack([x for x, _ in out]), torch.stack([y for _, y in out])


def loss_fn(vae, x, y, part):
    """--part all: L1 + MSE on the images plus L1 on the depth maps, through encoder and decoder; --part decoder:
    the depth term alone through the frozen encoder's latents."""
    if part == "decoder":
        return (vae.decode(encode_depth(vae, y)).mean(1, keepdim=True) - y).abs().mean()
    recon = vae.decode(vae.encode(torch.cat([x, y.expand(-1, 3, -1, -1)])))  # (2B, 3, H, W), posterior means
    err = recon[:len(x)] - x
    return (err.abs() + err**2).mean() + (recon[len(x):].mean(1, keepdim=True) - y).abs().mean()


def tune(vae, ds, cfg):
    """cfg.steps of VAE training (in place); returns the last 50 steps' mean loss."""
    params = [p for n, p in vae.named_parameters() if cfg.part == "all" or n.startswith(sd.DECODER)]
    for p in params:
        p.requires_grad_(True)
    opt, losses = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0), []
    for step in (bar := tqdm(range(cfg.steps), desc=f"vae ({cfg.part})", dynamic_ncols=True)):
        x, y = batch(ds, cfg, step, cfg.size, cfg.depth_norm)
        warm = min(1.0, (step + 1) / cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / cfg.steps))
        loss = loss_fn(vae, x, y, cfg.part)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    return sum(losses[-50:]) / len(losses[-50:])


@torch.no_grad()
def floor(vae, ds, cfg):
    """(RGB PSNR in dB, mean L1 of decode_depth(encode(y)) against y in normalised units) on the first N_FLOOR pairs."""
    pairs = [train_item(*ds[i], cfg.size, None, False, cfg.depth_norm) for i in range(min(N_FLOOR, len(ds)))]
    x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    mse = ((vae.decode(vae.encode(x)).clamp(-1, 1) - x) ** 2).mean().item()
    return 10 * math.log10(4 / mse), (decode_depth(vae, encode_depth(vae, y)) - y).abs().mean().item()


def base_for(bundle, cfg):
    """The base the new file names: --base, else the model's own, as a path from the new file's folder if it is a
    local file (None for a whole-bundle checkpoint: then everything is written)."""
    base = cfg.base or bundle.meta.get("base_model")
    local = not cfg.base and base and os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), base)
    if local and os.path.exists(local):
        return os.path.relpath(local, os.path.dirname(os.path.abspath(cfg.out)))
    return base or None


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the model whose VAE is tuned: the prior (--part all, before "
                   "train.py --task depth) or a depth model (train.py --task depth's final.safetensors)")
    p.add_argument("--data", help="pair folder (rgb/ + depth/) to tune on: the depth model's training data")
    p.add_argument("--from", dest="vae_from", metavar="FILE", help="instead, take the VAE of FILE (an earlier "
                   "output of this script: the VAE does not depend on the UNet)")
    p.add_argument("--part", default="all", choices=["all", "decoder"], help="what is tuned and written: the "
                   "whole VAE, or the decoder alone, the encoder frozen (default: %(default)s)")
    p.add_argument("--base", help="the base the file names, relative to --out (default: the model's own base, "
                   "if it has one, else the whole bundle is written)")
    p.add_argument("--out", required=True, help="the model file to write, with its VAE (never overwritten)")
    p.add_argument("--resolution", type=int, default=0, help="training crops' side in pixels, 0 = a depth model's "
                   "own, else 64 (default: %(default)s)")
    p.add_argument("--depth-norm", choices=list(NORMS), help="the depth maps' encoding (depth.normalize_depth; "
                   "default: a depth model's own, else marigold, the depth-demo preset's)")
    p.add_argument("--steps", type=int, default=250, help="tuning steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data order, crops and flips (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="weights written")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    return p


def settings(cfg, bundle):
    """The encoding and crop size: a depth model's own (a different --depth-norm is an error), else the flags'."""
    own = bundle.meta.get("depth_norm") if bundle.meta.get("task") == "depth" else None
    if own and cfg.depth_norm and cfg.depth_norm != own:
        common.usage_error(f"--depth-norm {cfg.depth_norm}: {cfg.ckpt} was trained on {own} depth")
    if cfg.part == "decoder" and bundle.meta.get("task") != "depth":
        common.fail(f"--ckpt {cfg.ckpt}: --part decoder needs a depth model (its frozen encoder's latents)")
    if cfg.part == "all" and cfg.data and bundle.meta.get("task") == "depth":
        common.fail(f"--ckpt {cfg.ckpt}: tuning a trained depth model's encoder moves the latents its UNet reads; "
                    "tune the prior's VAE before train.py --task depth, or pass --part decoder")
    cfg.depth_norm = own or cfg.depth_norm or "marigold"
    cfg.size = parse_resolution(cfg.resolution or (bundle.meta.get("resolution", 64) if own else 64))


def main(argv=None):
    cfg = parser().parse_args(argv)
    if min(cfg.steps, cfg.batch_size, cfg.warmup) < 1 or cfg.lr <= 0 or cfg.resolution < 0:
        common.usage_error("--steps, --batch-size and --warmup must be >= 1, --lr > 0 and --resolution >= 0")
    if bool(cfg.data) == bool(cfg.vae_from):
        common.usage_error("give --data (tune the VAE) or --from FILE (take the VAE of that file), not both")
    if os.path.exists(cfg.out):
        common.fail(f"--out {cfg.out} exists; pass a new file name (nothing is overwritten)")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:
        bundle = sd.load(cfg.ckpt)
        bundle.vae = sd.load(cfg.vae_from).vae if cfg.vae_from else bundle.vae
    except sd.LoadError as e:
        common.fail(str(e))
    settings(cfg, bundle)
    t0, info, what = time.time(), {}, f"the VAE of {cfg.vae_from}"
    if cfg.data:
        ds = PairDataset(cfg.data)
        (psnr0, l1_0), last = floor(bundle.vae, ds, cfg), tune(bundle.vae, ds, cfg)
        psnr, l1 = floor(bundle.vae, ds, cfg)
        info = dict(depth_vae_part=cfg.part, depth_vae_steps=cfg.steps, depth_vae_l1=f"{l1:.4f}",
                    depth_vae_psnr=f"{psnr:.2f}")
        what = (f"on the first {N_FLOOR} pairs RGB {psnr0:.2f} -> {psnr:.2f} dB PSNR, depth L1 {l1_0:.4f} -> {l1:.4f} "
                f"(last steps' loss {last:.4f}), {(time.time() - t0) / 60:.1f} min")
    keep = {k: v for k, v in bundle.meta.items() if k not in sd.metadata(bundle) and k != "base_model"}
    base = base_for(bundle, cfg)
    sd.save(bundle, cfg.out, dtype=getattr(torch, cfg.dtype), base=base, own_vae=cfg.part if base else "",
            **{**keep, **info})
    print(f"wrote {cfg.out}: {what}")


if __name__ == "__main__":
    common.one_line_warnings()
    main()
