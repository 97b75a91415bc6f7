"""Depth evaluation of the tiny family (RESULTS.md, "depth"): depth.py's models on pair folders, per-image metrics
(depth.depth_metrics, Marigold's protocol), each model's VAE floor and the trivial baselines: the training set's
mean depth map and depth linear in the image row (both ignore the image). The default pair folders are the two
held-out sets: scenes.py rooms of a seed never trained on, and toy/rooms_sdf.py scenes, a second renderer that
shares no code with the training scenes (geometry, shading, camera): how the models do off their own data.

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
import rooms_sdf  # noqa: E402
import scenes  # noqa: E402
import streets  # noqa: E402
from depth import (DEPTH_RANGES, PairDataset, decode_depth, depth_metrics, encode_depth, load_model,  # noqa: E402
                   mean_metrics, normalize_depth, predict, processing_size, size_multiple, square)
import data  # noqa: E402
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
    """The best any prediction through this VAE can do: decode(encode(normalised ground truth)), in the model's
    depth encoding, at the processing resolution and back, scored like a prediction."""
    rows, norm = [], bundle.meta.get("depth_norm", "ours")  # the encoding the model was trained on
    for i in range(min(n or len(ds), len(ds))):
        image, gt, valid = ds[i]
        H, W = gt.shape
        h, w = processing_size(H, W, res, size_multiple(bundle))
        d = F.interpolate(gt[None, None], (h, w), mode="nearest")
        v = F.interpolate(valid[None, None].float(), (h, w), mode="nearest") > 0.5
        y = normalize_depth(d, v, norm).to(next(bundle.vae.parameters()).device)
        y = decode_depth(bundle.vae, encode_depth(bundle.vae, y), clip=norm != "official")
        y = F.interpolate(y.cpu(), (H, W), mode="bilinear", align_corners=False)[0, 0]
        rows.append(image_metrics(y, gt, valid, drange))
    return mean_metrics(rows)


def heldout_scenes(size=64, n=128):
    """The held-out test scenes (scenes.TEST_SEED, never trained on), written once to runs/data/."""
    path = os.path.join(ROOT, "runs", "data", f"{data.DEMO_KINDS['scenes'][0]}-{size}px-seed{scenes.TEST_SEED}-n{n}")
    return common.written_once(path, lambda p: scenes.write_pairs(p, n, size, scenes.TEST_SEED))


def heldout_streets(size=64, n=128):
    """The held-out streets (streets.py, the second training renderer, scenes.TEST_SEED), written once to runs/data/."""
    path = os.path.join(ROOT, "runs", "data", f"{data.DEMO_KINDS['streets'][0]}-{size}px-seed{scenes.TEST_SEED}-n{n}")
    return common.written_once(path, lambda p: scenes.write_pairs(p, n, size, scenes.TEST_SEED, draw=streets.draw))


def unseen_scenes(size=64, n=128):
    """Scenes of the evaluation-only renderer (toy/rooms_sdf.py, never trained on), written once to runs/data/."""
    path = os.path.join(ROOT, "runs", "data", f"rooms_sdf-{size}px-seed{rooms_sdf.EVAL_SEED}-n{n}")
    return common.written_once(path, lambda p: rooms_sdf.write_pairs(p, n, size, rooms_sdf.EVAL_SEED))


def mean_depth_map(ds, res, norm="ours"):
    """The dataset's prior: the pixelwise mean of the pairs' normalised depth (depth.normalize_depth's `norm`) at
    res x res, (res, res)."""
    total = torch.zeros(res, res)
    for i in tqdm(range(len(ds)), desc="mean depth map", dynamic_ncols=True, leave=False):
        _, d, v = ds[i]
        total += normalize_depth(square(d[None], res, "nearest")[None], square(v[None], res, "nearest")[None] > 0.5,
                                 norm)[0, 0]
    return total / len(ds)


def row_ramp(res):
    """The image row, 0 at the top, as a (res, res) prediction: aligned per image by least squares it is the
    best depth linear in the row (in log depth: the best log depth linear in it), a baseline that ignores the
    image but knows the floor is near at the bottom."""
    return torch.arange(res, dtype=torch.float32)[:, None].expand(res, res) / (res - 1)


def evaluate_constant(y, ds, drange, n=None):
    """Metrics of one fixed prediction y (h, w) for every pair, resized to each: a baseline that ignores the image."""
    rows = [image_metrics(F.interpolate(y[None, None], gt.shape, mode="bilinear", align_corners=False)[0, 0], gt,
                          valid, drange) for _, gt, valid in (ds[i] for i in range(min(n or len(ds), len(ds))))]
    return mean_metrics(rows)


def baselines(data, ds, mean, drange, n, res):
    """The rows of the two trivial baselines on one pair folder (mean: the training set's mean map, or None)."""
    const = lambda name, what, y: {"data": data, "model": name, "objective": what, "steps": 0, "ensemble": 0,
                                   **evaluate_constant(y, ds, drange, n), "sec_per_image": 0.0}
    return ([const("training set", "mean depth map", mean)] if mean is not None else []) + \
        [const("-", "depth linear in row", row_ramp(res))]


def evaluate_models(ckpts, datas, steps=(1, 2, 4, 10), ensembles=(1, 4), n=None, drange=DEPTH_RANGES["scenes"],
                    res=None, seed=0, baseline=None, device="cpu"):
    """Every model x steps x ensemble on each pair folder of `datas` (+ each VAE's floor, the row baseline and, with
    `baseline`, a pair folder of training data, its mean depth map in the first model's depth encoding) -> rows."""
    bundles = [load_model(c, device) for c in ckpts]
    r0 = res or max(parse_resolution(bundles[0].meta.get("resolution", 64))) if bundles else res or 64
    norm = bundles[0].meta.get("depth_norm", "ours") if bundles else "ours"
    mean = mean_depth_map(PairDataset(baseline), r0, norm) if baseline else None
    rows = []
    for data in [datas] if isinstance(datas, str) else datas:
        ds, name = PairDataset(data), os.path.basename(os.path.normpath(data))
        rows += baselines(name, ds, mean, drange, n, r0)
        for bundle in bundles:
            r = res or max(parse_resolution(bundle.meta.get("resolution", 64)))
            rows.append({"data": name, "model": bundle.name, "objective": "VAE floor", "steps": 0, "ensemble": 0,
                         **vae_floor(bundle, ds, r, drange, n), "sec_per_image": 0.0})
            for s in steps:
                for e in ensembles:
                    m = evaluate(bundle, ds, s, e, seed, r, drange, n)
                    rows.append({"data": name, "model": bundle.name, "objective": bundle.objective, "steps": s,
                                 "ensemble": e, "depth_norm": bundle.meta.get("depth_norm", "ours"), **m})
                    print(markdown_table(rows[-1:], header=False))
    return rows


def markdown_table(rows, header=True):
    head = ("| data | model | objective | steps | ensemble | AbsRel | delta1 | delta2 | delta3 | RMSE (m) | "
            "AbsRel / delta1, depth-space alignment | s / image |\n|" + "---|" * 12 + "\n")
    lines = [f"| {r['data']} | {r['model']} | {r['objective']} | {r['steps'] or '-'} | {r['ensemble'] or '-'} | "
             f"{r['abs_rel']:.4f} | {r['delta1']:.4f} | {r['delta2']:.4f} | {r['delta3']:.4f} | {r['rmse']:.3f} | "
             f"{r['depth_abs_rel']:.4f} / {r['depth_delta1']:.4f} | {r['sec_per_image']:.3f} |" for r in rows]
    return (head if header else "") + "\n".join(lines)


def primary_metrics(rows):
    """(AbsRel key, delta1 key, words): depth-space alignment when every model predicts affine-invariant depth
    (depth_norm marigold, Marigold's protocol), else log-space alignment (the models predict log depth)."""
    if all(r.get("depth_norm") == "marigold" for r in rows if r["steps"]):
        return "depth_abs_rel", "depth_delta1", "in depth (the models predict affine-invariant depth)"
    return "abs_rel", "delta1", "in log depth (the models predict affine-invariant log depth)"


def data_table(rows, steps, ens, keys):
    """One pair folder's rows -> markdown lines: objective x ensemble (columns: steps), then the constant rows."""
    models = [r for r in rows if r["steps"]]
    get = {(r["objective"], r["steps"], r["ensemble"]): r for r in models}
    cells = lambda r, key: " | ".join(f"{r(s)[key]:.4f}" for s in steps)  # one row's values at every step count
    out = ["| model | ensemble | " + " | ".join(f"AbsRel @{s}" for s in steps) + " | "
           + " | ".join(f"delta1 @{s}" for s in steps) + " | s / image @" + str(steps[-1]) + " |",
           "|" + "---|" * (3 + 2 * len(steps))]
    for o in dict.fromkeys(r["objective"] for r in models):
        for e in ens:
            at = lambda s: get[(o, s, e)]
            out.append(f"| {o} | {e} | {cells(at, keys[0])} | {cells(at, keys[1])} | {at(steps[-1])['sec_per_image']:.3f} |")
    for r in {r["objective"]: r for r in rows if not r["steps"]}.values():  # the models share the prior's encoder
        out.append(f"| {r['objective']} | - | {cells(lambda s: r, keys[0])} | {cells(lambda s: r, keys[1])} | - |")
    return out


def verdict(rows, keys):
    """The best model row against the better trivial baseline: one line."""
    base = min((r for r in rows if r["objective"] in ("mean depth map", "depth linear in row")), key=lambda r: r[keys[0]])
    best = min((r for r in rows if r["steps"]), key=lambda r: r[keys[0]])
    gain = 1 - best[keys[0]] / base[keys[0]]
    return (f"- best: {best['objective']} at {best['steps']} step(s), ensemble {best['ensemble']}: AbsRel "
            f"{best[keys[0]]:.4f}, delta1 {best[keys[1]]:.4f}; the better trivial baseline ({base['objective']}) "
            f"{base[keys[0]]:.4f} / {base[keys[1]]:.4f}: {100 * gain:.0f}% lower AbsRel.")


def results_section(rows, command, datas=None):
    """RESULTS.md's depth section: per pair folder, AbsRel and delta1 by objective x ensemble (columns: steps),
    the VAE floor, the baselines, the time per image, and how the best model compares with the baselines."""
    keys = primary_metrics(rows)
    models = [r for r in rows if r["steps"]]
    steps, ens = sorted({r["steps"] for r in models}), sorted({r["ensemble"] for r in models})
    out = [f"`{command}`: {models[0]['n']} pairs per folder, per-image metrics after least-squares scale-and-shift "
           f"alignment {keys[2]}, clipped to the depth range; time per image on this machine, 1 CPU thread."]
    for data in dict.fromkeys(r["data"] for r in rows):
        these = [r for r in rows if r["data"] == data]
        out += ["", f"**{data}**", ""] + data_table(these, steps, ens, keys) + [""]
        get = {(r["objective"], r["steps"], r["ensemble"]): r for r in these if r["steps"]}
        objectives = list(dict.fromkeys(r["objective"] for r in these if r["steps"]))
        for e in ens:
            wins = [min(objectives, key=lambda o: get[(o, s, e)][keys[0]]) for s in steps]
            out.append(f"- ensemble {e}: lowest AbsRel at " + ", ".join(f"{s} step{'s' * (s > 1)}: {w}"
                                                                          for s, w in zip(steps, wins)) + ".")
        out.append(verdict(these, keys))
    return "\n".join(out)
