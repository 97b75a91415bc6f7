"""Pretrain the tiny SD family from scratch on synth.py shapes: the prior that plays SD's role in the demo and in
toy/evaluate.py (assets/demo/prior_tiny.safetensors is this run in fp16, see toy/make_demo.sh).

    python toy/pretrain.py                      # VAE, then UNet + text encoder: ~20 min on 2 cores
    python toy/pretrain.py --vae runs/pretrain/vae.safetensors --out runs/pretrain2   # stage 2 alone

Writes under --out: vae.safetensors (stage 1), prior.safetensors (sample.py reads its objective, prediction,
resolution and sampling defaults from the metadata), log.jsonl (one line per step of either stage) and
samples/prior.png (fixed prompts, fixed seed). Deterministic given --seed and the same torch build.

  1. tiny VAE (vae.py PRESETS["tiny"], 4x downsampling): --vae-steps of L1 + MSE reconstruction
     + 1e-6 x KL on fresh synthetic images; then scale_factor = 1 / std of the latents (what SD's
     0.18215 is for its VAE), so the UNet sees unit-variance latents.
  2. tiny UNet + tiny text encoder, trained JOINTLY from scratch (a random frozen text encoder also
     learns, but slower to follow the prompt): SD's v-prediction loss on SD's schedule, integer
     timesteps, --caption-dropout empty captions (for CFG), on --n-images pre-encoded synthetic images, EMA
     weights; captions lose their size / position phrase with probability 0.3 each (synth.short_caption),
     so that short prompts work.
Both stages: linear warmup over --warmup steps, then cosine decay to 10% of the peak learning rate.
"""
import argparse
import json
import os
import random
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: sd, train, ...

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
import diff2flow  # noqa: E402
import sd  # noqa: E402
import synth  # noqa: E402
import data  # noqa: E402
from data import stream_indices  # noqa: E402

PROMPTS = ["a large red circle at the center on a blue background",
           "a small yellow star at the top left on a black background",
           "a large green square at the bottom right on a white background",
           "a large white triangle at the center on a purple background"]  # samples/prior.png
SAMPLING = dict(steps=25, cfg=4.0)  # sample.py's defaults for the prior (metadata)
VAE_LR = 2e-3
VAE_BATCH = 32  # flat-coloured shapes: small batches reconstruct fine, and the VAE is the costlier model per image
ENCODE_BATCH = 256  # images per VAE call while encoding the UNet's data


def vae_loss(vae, x, kl_weight=1e-6):
    """L1 + MSE reconstruction of the posterior mean + kl_weight x KL(q(z|x) || N(0, I)) per latent element
    (LDM's tiny KL weight: the latents only need to stay bounded, not Gaussian). From the mean, not a
    posterior sample: at init that sample's noise (std 1) buries the latent, and in a few hundred steps
    the VAE only learned the background colour; the diffusion model uses the mean anyway (vae.encode)."""
    mean, logvar = vae.encode_moments(x)  # (B, 4, R/f, R/f) each, unscaled
    recon = vae.decoder(vae.post_quant_conv(mean))
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    # the shape covers ~5% of the pixels: weighted 10x (pixels off the median = background colour), else the
    # VAE spends hundreds of steps on backgrounds alone and decodes shapes as blurs
    mask = (x - x.flatten(2).median(2).values[..., None, None]).abs().sum(1, keepdim=True) > 0.1  # (B, 1, H, W)
    w = 1 + 9 * mask.float()
    err = recon - x
    return (w * (err.abs() + err**2)).mean() / w.mean() + kl_weight * kl


def train_vae(cfg, vae, log):
    """Stage 1: the VAE on a fresh batch of synthetic images every step, then its latent scale."""
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    vae.train()
    for step in (bar := tqdm(range(cfg.vae_steps), desc="vae", dynamic_ncols=True)):
        x, _ = synth.images(cfg.seed, step * VAE_BATCH, VAE_BATCH, cfg.resolution)
        for group in opt.param_groups:
            group["lr"] = common.lr_at(VAE_LR, step, cfg.warmup, cfg.vae_steps, "cosine")
        loss = vae_loss(vae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log.write(json.dumps({"stage": "vae", "step": step + 1, "loss": loss.item()}) + "\n")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SD's 0.18215 is 1 / std of its VAE's latents; ours is measured the same way
        x, _ = synth.images(cfg.seed + 1, 0, 512, cfg.resolution)
        vae.scale_factor = vae.cfg.scale_factor = 1.0 / vae.encode_moments(x)[0].std().item()
        err = (vae.decode(vae.encode(x)) - x).abs().mean().item()
    print(f"vae: latent scale_factor {vae.scale_factor:.4f}, reconstruction L1 {err:.4f} (images in [-1, 1])")


@torch.no_grad()
def encode_dataset(cfg, bundle):
    """--n-images synthetic images -> latent means (N, 4, R/f, R/f) and token ids (N, 77) of their captions,
    each shortened at random (one generator, seeded with --seed, in image order)."""
    latents, ids, rng = [], [], random.Random(cfg.seed)
    for start in tqdm(range(0, cfg.n_images, ENCODE_BATCH), desc="encoding", dynamic_ncols=True):
        x, captions = synth.images(cfg.seed, start, min(ENCODE_BATCH, cfg.n_images - start), cfg.resolution)
        latents.append(bundle.vae.encode(x))
        ids.append(bundle.tokenizer([synth.short_caption(synth.parse_caption(c), rng) for c in captions]))
    return torch.cat(latents), torch.cat(ids)


def train_prior(cfg, bundle, log):
    """Stage 2: UNet + text encoder jointly, SD's diffusion loss (v-prediction, integer timesteps): train.py's
    noise / timestep / caption-dropout draws (data.draw), AdamW, gradient clipping, EMA (common.EMA)."""
    latents, ids = encode_dataset(cfg, bundle)
    empty = bundle.tokenizer([""])  # (1, 77): dropped captions train the unconditional branch of CFG
    unet, text = bundle.unet.train(), bundle.text_encoder.train()
    params = [p for m in (unet, text) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema, abar = common.EMA(params, cfg.ema), bundle.alphas_cumprod
    for step in (bar := tqdm(range(cfg.steps), desc="unet + text", dynamic_ncols=True)):
        idx = torch.tensor(stream_indices(len(latents), cfg.seed, step * cfg.batch_size, cfg.batch_size))
        noise, t, drop = data.draw(cfg, "diffusion", step, len(idx), latents.shape[1:], len(abar), "cpu")
        context = text(torch.where(drop[:, None], empty, ids[idx]))  # (B, 77, width), with gradients
        loss = diff2flow.diffusion_loss(unet, latents[idx], context, abar, bundle.prediction, noise=noise, t=t)
        for group in opt.param_groups:
            group["lr"] = common.lr_at(cfg.lr, step, cfg.warmup, cfg.steps, "cosine")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        opt.step()
        ema.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log.write(json.dumps({"stage": "unet", "step": step + 1, "loss": loss.item()}) + "\n")
    torch._foreach_copy_([p.data for p in params], ema.shadow)  # keep the averaged weights
    unet.eval().requires_grad_(False), text.eval().requires_grad_(False)


def load_vae(path):
    """The VAE (with its scale_factor) of an earlier run's file: stage 1 skipped."""
    try:
        return sd.load(path).vae.eval().requires_grad_(False)
    except sd.LoadError as e:
        common.fail(f"--vae: {e}")


def save_samples(cfg, bundle, path):
    """samples/prior.png: PROMPTS from noise seeded with --seed, Euler through the Diff2Flow conversion."""
    f = bundle.vae.downsample
    noise = torch.randn((len(PROMPTS), bundle.vae.cfg.embed_dim, cfg.resolution // f, cfg.resolution // f),
                        generator=torch.Generator().manual_seed(cfg.seed))
    data.sample_grid(bundle, bundle.unet, "diffusion", bundle.encode_prompt(PROMPTS), bundle.encode_prompt([""]),
                      noise, path, nullcontext)


def pretrain(cfg):
    """The tiny VAE (or --vae's), then the tiny prior; writes vae.safetensors and prior.safetensors, returns
    the latter's path."""
    os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
    torch.manual_seed(cfg.seed)  # the models' initial weights
    bundle = sd.create(unet="tiny", vae="tiny", text="tiny", prediction="v")  # SD's schedule (sd_alphas_cumprod)
    stage1 = f"the VAE of {cfg.vae}" if cfg.vae else f"VAE {cfg.vae_steps} steps"
    print(f"pretraining the tiny family at {cfg.resolution} px, {cfg.threads} thread(s): {stage1}, then "
          f"UNet + text encoder {cfg.steps} steps of {cfg.batch_size} on {cfg.n_images} images")
    t0 = time.time()
    with open(os.path.join(cfg.out, "log.jsonl"), "a" if cfg.vae else "w") as log:
        if cfg.vae:
            bundle.vae = load_vae(cfg.vae)
        else:
            train_vae(cfg, bundle.vae, log)
            sd.save(bundle, os.path.join(cfg.out, "vae.safetensors"), resolution=cfg.resolution)
        t1 = time.time()
        train_prior(cfg, bundle, log)
    t2 = time.time()
    final = os.path.join(cfg.out, "prior.safetensors")
    sd.save(bundle, final, resolution=cfg.resolution, **SAMPLING, train_steps=cfg.steps,
            vae_steps=cfg.vae_steps, vae_minutes=f"{(t1 - t0) / 60:.1f}", unet_minutes=f"{(t2 - t1) / 60:.1f}")
    save_samples(cfg, bundle, os.path.join(cfg.out, "samples", "prior.png"))
    print(f"wrote {final} (VAE {(t1 - t0) / 60:.1f} min, UNet + text {(t2 - t1) / 60:.1f} min); "
          f"try: python sample.py --ckpt {final} --prompt {json.dumps(PROMPTS[0])}")
    return final


# ----------------------------------------------------------------------------- command line

def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    opt = lambda name, default, help, **kw: p.add_argument(  # noqa: E731
        name, default=default, type=type(default), help=f"{help} (default: %(default)s)", **kw)
    opt("--out", "runs/pretrain", "output folder")
    opt("--resolution", 32, "image side in pixels, a multiple of 8")
    opt("--batch-size", 64, "UNet stage: images per step")
    opt("--warmup", 100, "linear learning-rate warmup steps of either stage, then cosine to 10%%")
    opt("--ema", 0.999, "EMA decay of the UNet + text encoder weights that are saved (0 = off)")
    opt("--steps", 1500, "UNet + text encoder steps")
    opt("--lr", 1e-3, "UNet stage: peak learning rate (the VAE's: 2e-3)")
    opt("--weight-decay", 0.01, "UNet stage: AdamW weight decay")
    opt("--grad-clip", 1.0, "UNet stage: clip the gradient norm to this (0 = no clipping)")
    opt("--vae-steps", 700, "VAE steps before the UNet")
    p.add_argument("--vae", default="", metavar="FILE", help="skip stage 1 and take the VAE (with its scale_factor) "
                   "of this file, e.g. an earlier run's vae.safetensors")
    opt("--n-images", 16384, "synthetic training images the UNet sees (the VAE sees fresh ones)")
    opt("--seed", 0, "seed of the initial weights, images, caption shortening, data order, noise and timesteps")
    opt("--threads", 0, "torch CPU threads, 0 = 1 (on a busy 2-core machine 2 threads can be 10x slower for "
        "these small models)")
    opt("--t-sampling", "uniform", "data.draw's FM time distribution (unused by the diffusion loss's integer "
        "timesteps)", choices=diff2flow.FM_TIME_SAMPLINGS)
    opt("--caption-dropout", 0.1, "fraction of captions replaced by the empty prompt (trains the CFG branch)")
    return p


def check(cfg):
    """Usage errors (exit 2), and a missing --vae file (1), before anything runs."""
    if cfg.resolution < 8 or cfg.resolution % 8:
        common.usage_error(f"--resolution {cfg.resolution} must be a positive multiple of 8")
    for name, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("vae_steps", 0), ("n_images", 1),
                      ("threads", 0)):
        if getattr(cfg, name) < low:
            common.usage_error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")
    if not 0 <= cfg.caption_dropout <= 1 or not 0 <= cfg.ema < 1 or cfg.lr <= 0 or cfg.grad_clip < 0:
        common.usage_error("need 0 <= --caption-dropout <= 1, 0 <= --ema < 1, --lr > 0 and --grad-clip >= 0")
    if cfg.vae and not os.path.isfile(cfg.vae):  # before --out is made (the VAE loads after the models' init)
        common.fail(f"--vae {cfg.vae}: no such file")


def main(argv=None):
    cfg = parser().parse_args(argv)
    check(cfg)
    cfg.threads = cfg.threads or 1  # CPU only: see --threads
    torch.set_num_threads(cfg.threads)
    return pretrain(cfg)


if __name__ == "__main__":
    common.one_line_warnings()
    main()
