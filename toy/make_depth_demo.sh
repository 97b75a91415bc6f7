#!/usr/bin/env bash
# Rebuild the depth demo, assets/demo/depth_tiny.safetensors (UNet-only, fp16, ~3.5 MB: sd.load takes the VAE and
# text encoder from prior_tiny.safetensors, its base), and RESULTS.md's "depth" section:
#   1. python train.py --task depth --objective diff2flow | fm | diffusion: the tiny prior fine-tuned into an
#      image-to-depth model on 4096 scenes.py rooms at 64 px (written once to runs/data/, ~4 min), same data,
#      steps (600), seed for the three (~5 min each on one core, 1.7 of them encoding the pairs);
#   2. python toy/evaluate.py depth on 128 held-out rooms (seed 10001): steps 1/2/4/10 x ensemble 1/4, the VAE floor
#      and the training set's mean depth map as a baseline (~9 min) -> RESULTS.md;
#   3. the Diff2Flow run continued to 1500 steps (--resume, ~7 min), evaluated, and saved as the demo.
# Deterministic given the seeds and the same torch build. Usage: toy/make_depth_demo.sh [--fast], from anywhere
# (--fast: a few training steps and a 4-image evaluation, to check the script; writes runs/depth-fast/ only).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=600; DEMO_STEPS=1500; DEST=assets/demo; RUNS=runs; EVAL=(--results RESULTS.md); EVAL_DEMO=()
DATA=(); TRAIN_SCENES=runs/data/scenes-64px-seed0-n4096  # train.py's default data (written on its first run)
if [[ "${1:-}" == "--fast" ]]; then
  STEPS=2; DEMO_STEPS=4; DEST=runs/depth-fast; RUNS=runs/depth-fast; EVAL=(--n 4 --steps 1 --ensemble 1); EVAL_DEMO=(--n 4)
  mkdir -p "$DEST" && cp assets/demo/prior_tiny.safetensors "$DEST/"  # the base the demo file names
  TRAIN_SCENES=$RUNS/scenes; python toy/scenes.py --out "$TRAIN_SCENES" --n 16 --size 64; DATA=(--data "$TRAIN_SCENES")
fi
export DEST RUNS
for obj in diff2flow fm diffusion; do
  rm -rf "$RUNS/depth-$obj"
  python train.py --task depth --objective "$obj" --out "$RUNS/depth-$obj" --steps "$STEPS" "${DATA[@]}"
done
python toy/evaluate.py depth --ckpt "$RUNS/depth-diff2flow/final.safetensors" --ckpt "$RUNS/depth-fm/final.safetensors" \
  --ckpt "$RUNS/depth-diffusion/final.safetensors" --baseline "$TRAIN_SCENES" \
  --json "$RUNS/depth-eval.json" "${EVAL[@]}"
rm -rf "$RUNS/depth-diff2flow-$DEMO_STEPS" && cp -r "$RUNS/depth-diff2flow" "$RUNS/depth-diff2flow-$DEMO_STEPS"
python train.py --task depth --objective diff2flow --out "$RUNS/depth-diff2flow-$DEMO_STEPS" --steps "$DEMO_STEPS" \
  --resume "${DATA[@]}"
export DEMO_RUN="$RUNS/depth-diff2flow-$DEMO_STEPS"
python - <<'PY'
import os, torch, sd
b = sd.load(os.environ["DEMO_RUN"] + "/final.safetensors")
sd.save(b, os.environ["DEST"] + "/depth_tiny.safetensors", dtype=torch.float16, base="prior_tiny.safetensors",
        **{k: b.meta[k] for k in ("task", "resolution", "steps", "ensemble", "train_steps")})
PY
ls -l "$DEST/depth_tiny.safetensors"
python toy/evaluate.py depth --ckpt "$DEST/depth_tiny.safetensors" --steps 1 4 10 --ensemble 1 4 \
  --json "$RUNS/depth-eval-demo.json" "${EVAL_DEMO[@]}"
python depth.py runs/data/scenes-64px-seed10001-n128/rgb/0000{0,1,2,3}.png --ckpt "$DEST/depth_tiny.safetensors" \
  --out "$RUNS/depth-demo-out" --uncertainty
