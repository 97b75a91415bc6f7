"""Depth evaluation of the tiny family (RESULTS.md, "depth"): depth.py's models on pair folders, per-image metrics
(depth.depth_metrics, Marigold's protocol), each model's VAE floor and the trivial baselines.

    python toy/evaluate.py depth --ckpt runs/depth/final.safetensors     # the command; see its --help
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: sd, depth, ...

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
import scenes  # noqa: E402
from depth import (DEPTH_RANGES, PairDataset, decode_depth, depth_metrics, encode_depth, load_model,  # noqa: E402
                   mean_metrics, normalize_depth, predict, processing_size, size_multiple, square)
from data import parse_resolution  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def evaluate(bundle, ds, steps, ensemble, seed=0, res=None, drange=DEPTH_RANGES["scenes"], n=None):
    """Metrics of predict(bundle, ., steps, ensemble) over the first n pairs of ds, averaged per image: AbsRel,
    delta1..3, RMSE aligned in log depth, plus depth-space-aligned AbsRel and delta1 ("depth_" keys), and the
    seconds per image (model call, this machine). Image i uses noise seed + i."""
    context, rows, seconds = bundle.encode_prompt([""]), [], 0.0
    for i in tqdm(range(min(n or len(ds), len(ds))), desc=f"{bundle.name} steps {steps} ens {ensemble}",
                  dynamic_ncols=True, leave=False):
        image, gt, valid = ds[i]
        t0 = time.perf_counter()
        y, _ = predict(bundle, image, steps, ensemble, seed + i, res, context)
        seconds += time.perf_counter() - t0
        rows.append(image_metrics(y, gt, valid, drange))
    return {**mean_metrics(rows), "sec_per_image": seconds / len(rows), "n": len(rows)}


def image_metrics(y, gt, valid, drange):
    m = depth_metrics(y, gt, valid, *drange, align="log")
    d = depth_metrics(y, gt, valid, *drange, align="depth")
    return {**m, "depth_abs_rel": d["abs_rel"], "depth_delta1": d["delta1"]}


@torch.no_grad()
def vae_floor(bundle, ds, res, drange=DEPTH_RANGES["scenes"], n=None):
    """The best any prediction through this VAE can do: decode(encode(normalised ground truth)), at the
    processing resolution and back, scored like a prediction."""
    rows = []
    for i in range(min(n or len(ds), len(ds))):
        image, gt, valid = ds[i]
        H, W = gt.shape
        h, w = processing_size(H, W, res, size_multiple(bundle))
        d = F.interpolate(gt[None, None], (h, w), mode="nearest")
        v = F.interpolate(valid[None, None].float(), (h, w), mode="nearest") > 0.5
        y = decode_depth(bundle.vae, encode_depth(bundle.vae, normalize_depth(d, v).to(next(bundle.vae.parameters()).device)))
        y = F.interpolate(y.cpu(), (H, W), mode="bilinear", align_corners=False)[0, 0]
        rows.append(image_metrics(y, gt, valid, drange))
    return mean_metrics(rows)


def heldout_scenes(size=64, n=128):
    """The held-out test scenes (scenes.TEST_SEED, never trained on), written once to runs/data/."""
    path = os.path.join(ROOT, "runs", "data", f"scenes-{size}px-seed{scenes.TEST_SEED}-n{n}")
    return common.written_once(path, lambda p: scenes.write_pairs(p, n, size, scenes.TEST_SEED))


def mean_depth_map(ds, res):
    """The dataset's prior: the pixelwise mean of the pairs' normalised log depth at res x res, (res, res)."""
    total = torch.zeros(res, res)
    for i in tqdm(range(len(ds)), desc="mean depth map", dynamic_ncols=True, leave=False):
        _, d, v = ds[i]
        total += normalize_depth(square(d[None], res, "nearest")[None], square(v[None], res, "nearest")[None] > 0.5)[0, 0]
    return total / len(ds)


def evaluate_constant(y, ds, drange, n=None):
    """Metrics of one fixed prediction y (h, w) for every pair, resized to each: a baseline that ignores the image."""
    rows = [image_metrics(F.interpolate(y[None, None], gt.shape, mode="bilinear", align_corners=False)[0, 0], gt,
                          valid, drange) for _, gt, valid in (ds[i] for i in range(min(n or len(ds), len(ds))))]
    return mean_metrics(rows)


def evaluate_models(ckpts, data, steps=(1, 2, 4, 10), ensembles=(1, 4), n=None, drange=DEPTH_RANGES["scenes"],
                    res=None, seed=0, baseline=None, device="cpu"):
    """Every model x steps x ensemble on the pair folder `data` (+ each VAE's floor, + with `baseline`, a pair
    folder of training data, its mean depth map as a prediction) -> list of result rows."""
    ds, rows = PairDataset(data), []
    if baseline:
        mean = mean_depth_map(PairDataset(baseline), res or 64)
        rows.append({"model": os.path.basename(os.path.normpath(baseline)), "objective": "mean depth map",
                     "steps": 0, "ensemble": 0, **evaluate_constant(mean, ds, drange, n), "sec_per_image": 0.0})
    for ckpt in ckpts:
        bundle = load_model(ckpt, device)
        r = res or max(parse_resolution(bundle.meta.get("resolution", 64)))
        rows.append({"model": bundle.name, "objective": "VAE floor", "steps": 0, "ensemble": 0,
                     **vae_floor(bundle, ds, r, drange, n), "sec_per_image": 0.0})
        for s in steps:
            for e in ensembles:
                m = evaluate(bundle, ds, s, e, seed, r, drange, n)
                rows.append({"model": bundle.name, "objective": bundle.objective, "steps": s, "ensemble": e, **m})
                print(markdown_table(rows[-1:], header=False))
    return rows


def markdown_table(rows, header=True):
    head = ("| model | objective | steps | ensemble | AbsRel | delta1 | delta2 | delta3 | RMSE (m) | "
            "AbsRel / delta1, depth-space alignment | s / image |\n|" + "---|" * 11 + "\n")
    lines = [f"| {r['model']} | {r['objective']} | {r['steps'] or '-'} | {r['ensemble'] or '-'} | "
             f"{r['abs_rel']:.4f} | {r['delta1']:.4f} | {r['delta2']:.4f} | {r['delta3']:.4f} | {r['rmse']:.3f} | "
             f"{r['depth_abs_rel']:.4f} / {r['depth_delta1']:.4f} | {r['sec_per_image']:.3f} |" for r in rows]
    return (head if header else "") + "\n".join(lines)


def results_section(rows, command, data):
    """RESULTS.md's depth section: AbsRel and delta1 by objective x ensemble (columns: steps), the VAE floor,
    the time per image, and which objective wins at each step count."""
    models = [r for r in rows if r["steps"]]
    steps, ens = sorted({r["steps"] for r in models}), sorted({r["ensemble"] for r in models})
    get = {(r["objective"], r["steps"], r["ensemble"]): r for r in models}
    objectives = list(dict.fromkeys(r["objective"] for r in models))
    cells = lambda r, key: " | ".join(f"{r(s)[key]:.4f}" for s in steps)  # one row's values at every step count
    out = [f"`{command}`: {models[0]['n']} pairs of {os.path.relpath(data, ROOT)}, per-image metrics "
           "after least-squares scale-and-shift alignment in log depth, clipped to the depth range; "
           "time per image on this machine, 1 CPU thread.", "",
           "| objective | ensemble | " + " | ".join(f"AbsRel @{s}" for s in steps) + " | "
           + " | ".join(f"delta1 @{s}" for s in steps) + " | s / image @" + str(steps[-1]) + " |",
           "|" + "---|" * (3 + 2 * len(steps))]
    for o in objectives:
        for e in ens:
            at = lambda s: get[(o, s, e)]
            out.append(f"| {o} | {e} | {cells(at, 'abs_rel')} | {cells(at, 'delta1')} | "
                       f"{at(steps[-1])['sec_per_image']:.3f} |")
    for r in {r["objective"]: r for r in rows if not r["steps"]}.values():  # the models share the prior's VAE
        out.append(f"| {r['objective']} | - | {cells(lambda s: r, 'abs_rel')} | {cells(lambda s: r, 'delta1')} | - |")
    out.append("")
    for e in ens:
        wins = [min(objectives, key=lambda o: get[(o, s, e)]["abs_rel"]) for s in steps]
        out.append(f"- ensemble {e}: lowest AbsRel at " + ", ".join(f"{s} step{'s' * (s > 1)}: {w}"
                                                                      for s, w in zip(steps, wins)) + ".")
    return "\n".join(out)


