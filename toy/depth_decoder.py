"""Fine-tune the VAE decoder of a tiny depth model on depth maps: the one step of the toy depth recipe that is not
Marigold's, and why.

Marigold (and Diff2Flow's depth task) keep Stable Diffusion's VAE frozen: trained on billions of images, it
reconstructs a depth map drawn as a grey image almost exactly. Our tiny VAE (toy/pretrain.py) saw only flat-coloured
shapes, and through it decode(encode(depth)) alone, the best any depth model could do, is at AbsRel 0.175 (delta1
0.77) on held-out scenes.py rooms and 0.137 (0.82) on toy/rooms_sdf.py scenes (128 each, 64 px, Marigold's encoding
and depth-space alignment): no model could reach a useful error. After the 400 steps of this: 0.021 (0.989) and
0.027 (0.982), the encoder unchanged (toy/evaluate.py depth, the "VAE floor" rows). So this trains the decoder (with
post_quant_conv) to invert the FROZEN encoder on depth maps: the latent space, what the UNet is trained on and
predicts, stays the prior's; only the way back from latents to pixels improves. It needs no UNet: run it after
(or while) train.py trains the depth model, then it writes that model's file with the decoder in it.

    python toy/depth_decoder.py --ckpt runs/depth/final.safetensors --data runs/data/scenes-v2-64px-seed0-n8192 \\
        --out runs/depth/with_decoder.safetensors
    python toy/depth_decoder.py --ckpt runs/depth-fm/final.safetensors --from runs/depth/with_decoder.safetensors \\
        --out runs/depth-fm/with_decoder.safetensors      # the same decoder on another depth model

The loss is L1 between the decoded image's channel mean (what depth.decode_depth reads) and the normalised depth
the latent was encoded from, on --steps batches of training pairs read from disk (random crops and flips as
train.py's --crop random --random-flip), AdamW with linear warmup and cosine decay. The file written is
sd.save(..., base=the model's base, vae_decoder=True): the UNet and the decoder, the rest from the base.
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
from depth import PairDataset, decode_depth, encode_depth, load_model, train_item  # noqa: E402


def batch(ds, cfg, step, size, norm):
    """Normalised depth maps (B, 1, H, W) of the step's pairs, each randomly cropped and mirrored (seeded)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    out = []
    for i in stream_indices(len(ds), cfg.seed, step * cfg.batch_size, cfg.batch_size):
        crop, flip = torch.rand(2, generator=g).tolist(), bool(torch.rand(1, generator=g) < 0.5)
        out.append(train_item(*ds[i], size, crop, flip, norm)[1])
    return torch.stack(out)


def tune(bundle, ds, cfg):
    """cfg.steps of decoder training (in place); returns the last 50 steps' mean loss."""
    vae, size = bundle.vae, parse_resolution(bundle.meta.get("resolution", 64))
    params = [p for n, p in vae.named_parameters() if n.startswith(sd.DECODER)]
    for p in params:
        p.requires_grad_(True)
    opt, losses = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0), []
    norm = bundle.meta.get("depth_norm", "ours")
    for step in (bar := tqdm(range(cfg.steps), desc="decoder", dynamic_ncols=True)):
        y = batch(ds, cfg, step, size, norm)  # (B, 1, H, W)
        z = encode_depth(vae, y)  # the frozen encoder: the latents the UNet predicts
        warm = min(1.0, (step + 1) / cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / cfg.steps))
        loss = (vae.decode(z).mean(1, keepdim=True) - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    return sum(losses[-50:]) / len(losses[-50:])


@torch.no_grad()
def floor(bundle, ds, n=64):
    """Mean L1 of decode_depth(encode(y)) against y, normalised units, on the first n pairs (centre crops)."""
    size, norm = parse_resolution(bundle.meta.get("resolution", 64)), bundle.meta.get("depth_norm", "ours")
    y = torch.stack([train_item(*ds[i], size, None, False, norm)[1] for i in range(min(n, len(ds)))])
    return (decode_depth(bundle.vae, encode_depth(bundle.vae, y)) - y).abs().mean().item()


def base_for(bundle, cfg):
    """The base the new file names: the model's own, as a path from the new file's folder if it is a local file
    (None for a whole-bundle checkpoint: then everything is written)."""
    base = bundle.meta.get("base_model")
    local = base and os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), base)
    if local and os.path.exists(local):
        return os.path.relpath(local, os.path.dirname(os.path.abspath(cfg.out)))
    return base or None


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the depth model (train.py --task depth's final.safetensors)")
    p.add_argument("--data", help="pair folder of training depth maps (rgb/ + depth/): train the decoder on them")
    p.add_argument("--from", dest="decoder_from", metavar="FILE", help="instead, take the decoder of FILE (an "
                   "earlier output of this script: the decoder does not depend on the UNet)")
    p.add_argument("--base", help="the base the file names, relative to --out (default: the model's own base, "
                   "if it has one, else the whole bundle is written)")
    p.add_argument("--out", required=True, help="the model file to write, with its decoder (never overwritten)")
    p.add_argument("--steps", type=int, default=400, help="decoder steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="depth maps per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data order, crops and flips (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="weights written")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    return p


def main(argv=None):
    cfg = parser().parse_args(argv)
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.warmup < 1 or cfg.lr <= 0:
        common.usage_error("--steps, --batch-size and --warmup must be >= 1 and --lr > 0")
    if bool(cfg.data) == bool(cfg.decoder_from):
        common.usage_error("give --data (train the decoder) or --from FILE (take the decoder of that file), not both")
    if os.path.exists(cfg.out):
        common.fail(f"--out {cfg.out} exists; pass a new file name (nothing is overwritten)")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    bundle = load_model(cfg.ckpt, "cpu")
    if bundle.meta.get("task") != "depth":
        common.fail(f"--ckpt {cfg.ckpt}: not a depth model (train.py --task depth's final.safetensors)")
    t0, info = time.time(), {}
    if cfg.decoder_from:
        bundle.vae = load_model(cfg.decoder_from, "cpu").vae  # the same encoder (the prior's), that file's decoder
        what = f"the decoder of {cfg.decoder_from}"
    else:
        ds = PairDataset(cfg.data)
        before, last = floor(bundle, ds), tune(bundle, ds, cfg)
        after = floor(bundle, ds)
        info = dict(decoder_steps=cfg.steps, decoder_l1=f"{after:.4f}")
        what = (f"decoder L1 on the first 64 pairs {before:.4f} -> {after:.4f} (last steps' loss {last:.4f}), "
                f"{(time.time() - t0) / 60:.1f} min")
    keep = {k: v for k, v in bundle.meta.items() if k not in sd.metadata(bundle) and k != "base_model"}
    sd.save(bundle, cfg.out, dtype=getattr(torch, cfg.dtype), base=cfg.base or base_for(bundle, cfg),
            vae_decoder=True, **{**keep, **info})
    print(f"wrote {cfg.out}: {what}")


if __name__ == "__main__":
    common.one_line_warnings()
    main()
