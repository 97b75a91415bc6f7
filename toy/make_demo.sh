#!/usr/bin/env bash
# Rebuild the bundled demo, assets/demo/{prior_tiny,d2f_tiny,reflow_tiny}.safetensors (fp16, ~24 MB), from scratch:
#   1. the tiny prior: python toy/pretrain.py (VAE, then UNet + text encoder; ~20 min on 2 cores)
#   2. its Diff2Flow fine-tune: python train.py --task t2i with no other arguments (~3 min), saved UNet-only:
#      sd.load() takes the VAE and text encoder from the prior it names (base=), which keeps the demo small.
# Deterministic given the seed (0) and the same torch build. Usage: toy/make_demo.sh [--fast], from anywhere
# (--fast: a few steps of each, to check the script; it writes runs/demo-fast/, not assets/demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=assets/demo
FAST=(); N_PAIRS=4096
if [[ "${1:-}" == "--fast" ]]; then FAST=(--steps 4); DEST=runs/demo-fast; N_PAIRS=64; fi
export DEST
mkdir -p "$DEST"
rm -rf runs/pretrain runs/t2i runs/reflow
python toy/pretrain.py --out runs/pretrain "${FAST[@]}" ${FAST:+--vae-steps 4 --n-images 256}
python - <<'PY'
import os, torch, sd
b = sd.load("runs/pretrain/prior.safetensors")
sd.save(b, os.environ["DEST"] + "/prior_tiny.safetensors", dtype=torch.float16, **{k: b.meta[k] for k in
        ("resolution", "steps", "cfg", "train_steps", "vae_steps", "vae_minutes", "unet_minutes")})
PY
python train.py --task t2i --out runs/t2i "${FAST[@]}"
python - <<'PY'
import os, torch, sd
b = sd.load("runs/t2i/final.safetensors")  # a Diff2Flow model: 4 Euler steps are its default
sd.save(b, os.environ["DEST"] + "/d2f_tiny.safetensors", dtype=torch.float16, base="prior_tiny.safetensors",
        resolution=b.meta["resolution"], steps=4, cfg=b.meta["cfg"], train_steps=b.meta["train_steps"])
PY
# 3. its reflow: python train.py --task reflow (4096 teacher pairs of d2f_tiny, 40 steps, CFG 4; then a LoRA rank 16;
#    ~15 min), saved as an fp16 LoRA (< 1 MB) naming d2f_tiny as its base; sample.py's default demo model (4 steps,
#    no CFG). Its teacher is assets/demo/d2f_tiny.safetensors (with --fast: the committed one). Its prompts (the
#    reflow-demo preset's, made once under runs/data/): synth.py captions, each losing its size / position phrase
#    with probability 0.3 (line j: synth.short_prompt(0, j)).
python train.py --task reflow --out runs/reflow --n-pairs "$N_PAIRS" "${FAST[@]}" ${FAST:+--teacher-steps 2}
python - <<'PY'
import os
from safetensors import safe_open
from safetensors.torch import load_file, save_file
src = "runs/reflow/final.safetensors"
with safe_open(src, "pt") as f:  # steps=4, cfg=1.0, objective, LoRA config; the base relative to the demo folder
    meta = {**f.metadata(), "base_model": "d2f_tiny.safetensors"}
save_file({k: v.half() for k, v in load_file(src).items()}, os.environ["DEST"] + "/reflow_tiny.safetensors",
          metadata=meta)
PY
ls -l "$DEST"
python sample.py --ckpt "$DEST/reflow_tiny.safetensors" --prompt "a red circle on a blue background" \
    --out runs/demo_samples
