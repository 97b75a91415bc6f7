#!/usr/bin/env bash
# Rebuild the depth demo, assets/demo/depth_tiny.safetensors (fp16, ~6 MB: the UNet and its VAE; sd.load takes the
# text encoder from prior_tiny.safetensors, its base), and RESULTS.md's "depth-demo" section, in one command,
# ~48 min on 2 CPU cores (measured, RESULTS.md; one process at a time, so steps 2 and 3 take both: --threads 2):
#   1. the training data, once (train.py's default depth data, seed 0, 2 processes): 8192 scenes.py rooms at 64 px
#      (~4 min) and 4096 toy/streets.py streets, the second renderer (our Virtual KITTI; ~3 min);
#   2. python toy/depth_vae.py --part all: the prior's VAE tuned on the rooms' images and depth maps (the
#      toy's one step beyond Marigold, whose SD VAE already encodes both: see its docstring), ~5 min;
#   3. python train.py --task depth --preset depth-demo --ckpt (that prior) --steps $DEMO_STEPS: Diff2Flow, the prior
#      fine-tuned Marigold-style on rooms and streets mixed 2:1 (their sizes), predicting affine-invariant depth
#      (--depth-norm marigold, --cache), every step at t_FM = 0 (--t-sampling noise_end: the one time the 1-step
#      sampler reads), ~25 min with the encoding;
#   4. python toy/evaluate.py depth on three held-out sets, 128 rooms and 128 streets of seed 10001 and 128 scenes of
#      toy/rooms_sdf.py, the renderer no model trains on: steps 1/2/4/10 x ensemble 1/4, the VAE floor and the
#      trivial baselines (the training rooms' mean depth map, depth linear in the row) -> RESULTS.md (~8 min).
# With --compare it also trains the three objectives (diff2flow, fm, diffusion) on the rooms alone, steps (600), noise
# and seed from the untuned prior (uniform t, lr 2e-4), each with the VAE decoder tuned on depth maps
# (toy/depth_vae.py --part decoder), and writes RESULTS.md's "depth" section (~30 min more).
# Deterministic given the seeds and the same torch build. Usage: toy/make_depth_demo.sh [--fast] [--compare], from
# anywhere (--fast: a few steps and a 4-image evaluation, to check the script; it writes runs/depth-fast/ only).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_STEPS=4500; VAE_STEPS=250; THREADS=2; CMP_STEPS=600; DEC_STEPS=400; DEST=assets/demo; RUNS=runs
EVAL=(); COMPARE=0; DATA=()
TRAIN_SCENES=runs/data/scenes-v3-64px-seed0-n8192  # train.py's default depth data (data.DEMO_KINDS), with the streets
TRAIN_STREETS=runs/data/streets-v1-64px-seed0-n4096
CMP_DATA=(--data "$TRAIN_SCENES")  # --compare: the rooms alone (as RESULTS.md's "depth" section was measured)
for arg in "$@"; do
  case "$arg" in
    --compare) COMPARE=1 ;;
    --fast) DEMO_STEPS=2; VAE_STEPS=2; CMP_STEPS=2; DEC_STEPS=2; DEST=runs/depth-fast; RUNS=runs/depth-fast; EVAL=(--n 4 --steps 1 --ensemble 1)
            mkdir -p "$DEST" && cp assets/demo/prior_tiny.safetensors "$DEST/"  # the base the demo file names
            TRAIN_SCENES=$RUNS/scenes; python toy/scenes.py --out "$TRAIN_SCENES" --n 16 --size 64
            TRAIN_STREETS=$RUNS/streets; python toy/streets.py --out "$TRAIN_STREETS" --n 8 --size 64
            DATA=(--data "$TRAIN_SCENES" --data "$TRAIN_STREETS" --no-cache); CMP_DATA=(--data "$TRAIN_SCENES" --no-cache) ;;
    *) echo "usage: toy/make_depth_demo.sh [--fast] [--compare]" >&2; exit 2 ;;
  esac
done
RESULTS=(--results RESULTS.md); [[ -n "${EVAL[*]}" ]] && RESULTS=(--results "$RUNS/RESULTS.md")
export DEST RUNS
[[ -z "${DATA[*]}" ]] && python -c "import data; [data.demo(k, 64)[1]() for k in ('demo:scenes', 'demo:streets')]"  # 1
rm -rf "$RUNS/depth-demo" "$RUNS/depth-vae" "$RUNS/depth-decoder"
mkdir -p "$RUNS/depth-vae"
python toy/depth_vae.py --part all --ckpt assets/demo/prior_tiny.safetensors --data "$TRAIN_SCENES" \
  --out "$RUNS/depth-vae/prior.safetensors" --steps "$VAE_STEPS" --threads "$THREADS"  # step 2
python train.py --task depth --preset depth-demo --ckpt "$RUNS/depth-vae/prior.safetensors" --out "$RUNS/depth-demo" \
  --steps "$DEMO_STEPS" --threads "$THREADS" "${DATA[@]}"  # step 3
python toy/depth_vae.py --ckpt "$RUNS/depth-demo/final.safetensors" --from "$RUNS/depth-vae/prior.safetensors" \
  --base prior_tiny.safetensors --dtype float16 --out "$DEST/depth_tiny.new.safetensors"  # the UNet + its VAE
mv "$DEST/depth_tiny.new.safetensors" "$DEST/depth_tiny.safetensors"
ls -l "$DEST/depth_tiny.safetensors"
python toy/evaluate.py depth --ckpt "$DEST/depth_tiny.safetensors" --baseline "$TRAIN_SCENES" \
  --json "$RUNS/depth-eval-demo.json" --section depth-demo "${RESULTS[@]}" "${EVAL[@]}"
python depth.py assets/room.png --ckpt "$DEST/depth_tiny.safetensors" --out "$RUNS/depth-demo-out" --uncertainty
if [[ "$COMPARE" == 1 ]]; then  # the same data, steps, noise and seed; one encoded cache, the same decoder
  mkdir -p "$RUNS/depth-decoder"
  python train.py --task depth --preset depth-demo --out "$RUNS/depth-decoder" --steps 1 --no-cache \
    --sample-every 0 "${CMP_DATA[@]}" > /dev/null  # a depth model file of the preset's encoding: the decoder's start
  python toy/depth_vae.py --part decoder --ckpt "$RUNS/depth-decoder/final.safetensors" --data "$TRAIN_SCENES" \
    --out "$RUNS/depth-decoder/decoder.safetensors" --steps "$DEC_STEPS" --batch-size 32
  CKPTS=(); CACHE=""
  for obj in diff2flow fm diffusion; do
    rm -rf "$RUNS/depth-$obj" && mkdir -p "$RUNS/depth-$obj"
    [[ -n "$CACHE" ]] && cp -r "$CACHE" "$RUNS/depth-$obj/cache"
    python train.py --task depth --preset depth-demo --objective "$obj" --t-sampling uniform --lr 2e-4 --lr-decay none \
      --out "$RUNS/depth-$obj" --steps "$CMP_STEPS" "${CMP_DATA[@]}"
    [[ -d "$RUNS/depth-$obj/cache" ]] && CACHE="$RUNS/depth-$obj/cache"
    python toy/depth_vae.py --part decoder --ckpt "$RUNS/depth-$obj/final.safetensors" \
      --from "$RUNS/depth-decoder/decoder.safetensors" --out "$RUNS/depth-$obj/with_decoder.safetensors"
    CKPTS+=(--ckpt "$RUNS/depth-$obj/with_decoder.safetensors")
  done
  python toy/evaluate.py depth "${CKPTS[@]}" --baseline "$TRAIN_SCENES" --json "$RUNS/depth-eval.json" \
    "${RESULTS[@]}" "${EVAL[@]}"
fi
