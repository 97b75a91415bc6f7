"""Reflow evaluation of the tiny family (RESULTS.md, "reflow"): teacher (with its CFG) vs the reflowed student
(cfg 1) at 1, 2, 4, 8 Euler steps, and the teacher at 25 and 40: latent MSE and image PSNR against the teacher's
40-step output from the same noise, FD and prompt-attribute accuracy (metrics.py's classifier and held-out data,
as toy/evaluate.py reproduce), the straightness of the 40-step paths (mean_k ||v_k - (x_1 - x_0)||^2 /
||x_1 - x_0||^2, see euler_path) and the run-to-run spread of FD / accuracy (the teacher at 25 steps and the
student at 2 and 4 from SEEDS noise seeds).

    python toy/evaluate.py reflow --student runs/reflow/final.safetensors     # RESULTS.md section "reflow"
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: sd, reflow, ...

import torch  # noqa: E402

import diff2flow  # noqa: E402
import metrics  # noqa: E402
import sd  # noqa: E402
from reflow import STUDENT_CFG, latent_shape  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
DEMO_TEACHER = os.path.join(ROOT, "assets", "demo", "d2f_tiny.safetensors")  # the demo student's teacher
SEEDS = 3  # noise seeds of the target rows (teacher@25, reflow@2, reflow@4): their run-to-run spread


def euler_path(model, noise, steps, context, uncond=None, cfg_scale=1.0):
    """diff2flow.sample_euler, also returning the straightness of the path it took:
    S = mean_k ||v_k - (x_1 - x_0)||^2 / ||x_1 - x_0||^2 (mean over images), 0 for a straight line. With
    uniform Euler steps x_1 - x_0 = mean_k v_k, so S is the variance of the velocity along the path."""
    vs = []  # the guided velocity of every step, as sample_euler's callback reports it
    x = diff2flow.sample_euler(model, noise, steps, context, uncond, cfg_scale, callback=lambda s: vs.append(s["v"]))
    d = (x - noise).flatten(1)  # (B, D)
    dev = torch.stack([(v.flatten(1) - d).pow(2).sum(1) for v in vs]).mean(0)  # (B,)
    return x, (dev / d.pow(2).sum(1)).mean().item()


def psnr(a, b):
    """Mean PSNR (dB) of images in [-1, 1] (peak-to-peak 2), per image then averaged."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(4 / mse)).mean().item()


@torch.no_grad()
def solve(bundle, context, noise, steps, cfg, batch=128):
    """Latents (N, C, h, w) and the straightness of their Euler paths (mean over batches)."""
    model = diff2flow.velocity_model(bundle.unet, bundle.alphas_cumprod, bundle.prediction, bundle.objective)
    uncond, zs, s = bundle.encode_prompt([""]), [], []
    for i in range(0, len(noise), batch):
        z, straight = euler_path(model, noise[i:i + batch], steps, context[i:i + batch], uncond, cfg)
        zs.append(z)
        s.append(straight * len(z))
    return torch.cat(zs), sum(s) / len(noise)


@torch.no_grad()
def decode(bundle, z, batch=256):
    return torch.cat([bundle.vae.decode(z[i:i + batch]).clamp(-1, 1) for i in range(0, len(z), batch)])


def noise_of(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def attribute_rows(classifier, data, bundle, prior, n, seed):
    """Per-attribute accuracy of the ceilings (the real test images; their VAE reconstructions: the best a model
    can do through this VAE) and, given `prior` (a file), of the prior at its own resolution, 4 and 25 steps."""
    with torch.no_grad():
        recon = decode(bundle, bundle.vae.encode(data["test"]))
    rows = [{"model": "real images", **metrics.image_scores(classifier, data["test"], data)},
            {"model": "VAE reconstructions", **metrics.image_scores(classifier, recon, data)}]
    if prior:
        pb = sd.load(prior)
        res = int(pb.meta.get("resolution", 32))
        pdata = metrics.held_out(pb, res, n, 1)
        for k in (4, 25):
            z = solve(pb, pdata["test_ctx"], noise_of((n, *latent_shape(pb, res)), seed), k, float(pb.meta.get("cfg", 7.5)))[0]
            rows.append({"model": f"prior ({res} px)", "steps": k, **metrics.image_scores(classifier, decode(pb, z), pdata)})
    return rows


def evaluate_reflow(teacher, student, n=512, steps=(1, 2, 4, 8), ref_steps=(25, 40), seed=0, results=None,
                    classifier_dir="runs/reproduce", classifier_steps=1500, prior=None):
    """The numbers of RESULTS.md's "reflow" section (see the module docstring); returns them as a dict."""
    t0 = time.time()
    tb, sb = sd.load(teacher), sd.load(student)
    resolution = int(tb.meta.get("resolution", 32))
    classifier = metrics.cached_classifier(classifier_dir, classifier_steps)
    data = metrics.held_out(tb, resolution, n, 1)  # one validation latent: the FM loss is not measured here
    # name -> (bundle, test contexts, guidance): the teacher with its CFG, the student with its own (1)
    models = {"teacher": (tb, data["test_ctx"], float(tb.meta.get("cfg", 7.5))),
              "reflow": (sb, metrics.held_out(sb, resolution, n, 1)["test_ctx"],
                         float(sb.meta.get("cfg", STUDENT_CFG)))}
    shape = (n, *latent_shape(tb, resolution))
    noise = noise_of(shape, seed)
    ref_z, ref_s = solve(*models["teacher"][:2], noise, 40, models["teacher"][2])
    ref = (ref_z, decode(tb, ref_z))

    def scores(name, k, noise, z=None):
        """Latents and FD / acc of model `name` at k steps from `noise`."""
        bundle, ctx, cfg = models[name]
        z = solve(bundle, ctx, noise, k, cfg)[0] if z is None else z
        img = decode(bundle, z)
        return z, img, metrics.image_scores(classifier, img, data)

    def row(name, k):
        z, img, sc = scores(name, k, noise, ref_z if (name, k) == ("teacher", 40) else None)
        r = {"model": name, "steps": k, "calls": k * (2 if models[name][2] != 1 else 1), "cfg": models[name][2],
             "mse": (z - ref[0]).pow(2).mean().item(), "psnr": psnr(img, ref[1]), **sc}
        print(json.dumps(r))
        return r

    res = {"n": n, "teacher": os.path.relpath(teacher, ROOT), "student": os.path.relpath(student, ROOT),
           "teacher_cfg": models["teacher"][2], "student_cfg": models["reflow"][2],
           "rows": [row(m, k) for k in steps for m in ("teacher", "reflow")] + [row("teacher", k) for k in ref_steps],
           "student_meta": {k: sb.meta[k] for k in ("n_pairs", "teacher_steps", "teacher_cfg", "train_steps",
                                                     "lora_config") if k in sb.meta}}
    res["seeds"] = {}  # FD / acc of the target rows from SEEDS noise seeds: the run-to-run spread
    for name, k in (("teacher", 25), ("reflow", 4), ("reflow", 2)):
        first = next(r for r in res["rows"] if (r["model"], r["steps"]) == (name, k))
        res["seeds"][f"{name}@{k}"] = [{"fd": first["fd"], "acc": first["acc"]}] + [
            scores(name, k, noise_of(shape, seed + i))[2] for i in range(1, SEEDS)]
    res["straightness"] = {"teacher": ref_s, "reflow": solve(*models["reflow"][:2], noise, 40, models["reflow"][2])[1]}
    res["attributes"] = attribute_rows(classifier, data, tb, prior, n, seed)
    res["minutes"] = (time.time() - t0) / 60
    if results:
        metrics.update_results(results, "reflow", report(res))
    return res


def seed_stats(runs):
    """Mean and spread (max - min) of FD and acc over noise seeds."""
    out = {}
    for key in ("fd", "acc"):
        v = [r[key] for r in runs]
        out[key], out[key + "_spread"] = sum(v) / len(v), max(v) - min(v)
    return out


def verdicts(res):
    """Targets on the means over the seeds: reflow at 4 steps as good as the teacher at 25 (FD no higher, acc no
    lower, than the teacher's plus / minus its seed-to-seed spread), at 2 steps close (within 3x that spread)."""
    st = {name: seed_stats(runs) for name, runs in res["seeds"].items()}
    ref = st["teacher@25"]

    def ok(name, slack):
        s = st[name]
        return s["fd"] <= ref["fd"] + slack * ref["fd_spread"] + 1e-9 and \
            s["acc"] >= ref["acc"] - slack * ref["acc_spread"] - 1e-9
    return {"stats": st, "four": ok("reflow@4", 1), "two": ok("reflow@2", 1), "two_close": ok("reflow@2", 3)}


def how(meta):
    """One line on how the student was made, from its metadata (train.py --task reflow writes it)."""
    if "n_pairs" not in meta:
        return ""
    rank = json.loads(meta["lora_config"])["rank"] if "lora_config" in meta else None
    return (f"The student: `train.py --task reflow`, {meta['n_pairs']} pairs of the teacher ({meta['teacher_steps']} "
            f"Euler steps, CFG {meta['teacher_cfg']}), {meta.get('train_steps', '?')} steps, "
            f"{f'LoRA rank {rank:g}' if rank else 'full fine-tuning'}.")


def report(res):
    v = verdicts(res)
    md = ["## Reflow: 2-4 step sampling (tiny family)\n",
          f"Written by `python toy/evaluate.py reflow` in {res['minutes']:.1f} min. Teacher `{res['teacher']}` "
          f"(Euler, CFG {res['teacher_cfg']}); student `{res['student']}`, its 1-rectified flow (Euler, "
          f"CFG {res['student_cfg']}: one UNet call per step). {res['n']} held-out test captions, the same noise "
          "for every row. MSE (latents) and PSNR (decoded images) against the teacher's 40-step output from "
          "that noise; FD / acc as in the fine-tuning section (classifier features vs real test images; "
          "prompt attributes recognised).", how(res.get("student_meta", {})) + "\n",
          "| model | steps | UNet calls | latent MSE to teacher@40 | PSNR (dB) | FD | acc |",
          "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        psnr_cell = "(reference)" if r["mse"] == 0 else f"{r['psnr']:.1f}"
        md.append(f"| {r['model']} | {r['steps']} | {r['calls']} | {r['mse']:.4f} | {psnr_cell} | "
                  f"{r['fd']:.1f} | {r['acc']:.3f} |")
    s = res["straightness"]
    md += ["", f"Straightness of the 40-step paths, mean_k ||v_k - (x_1 - x_0)||^2 / ||x_1 - x_0||^2 (0 = straight): "
           f"teacher {s['teacher']:.4f}, reflow {s['reflow']:.4f}.\n",
           f"Run-to-run spread: FD / acc over {len(res['seeds']['teacher@25'])} noise seeds (mean, and max - min):\n",
           "| model | steps | FD mean | FD spread | acc mean | acc spread |", "|---|---|---|---|---|---|"]
    for name, st in v["stats"].items():
        model, k = name.split("@")
        md.append(f"| {model} | {k} | {st['fd']:.1f} | {st['fd_spread']:.1f} | {st['acc']:.3f} | "
                  f"{st['acc_spread']:.3f} |")
    md += ["", "Targets, on these means (\"as good as\" = FD no higher and acc no lower than the teacher@25's, "
           "give or take its spread): reflow at 4 steps as good as the teacher at 25: "
           f"**{'met' if v['four'] else 'not met'}**; reflow at 2 steps close (within 3x the spread): "
           f"**{'met' if v['two_close'] else 'not met'}**{' (even within 1x)' if v['two'] else ''}.\n"]
    return "\n".join(md + attribute_report(res))


ATTRS = ("shape", "color", "size", "position", "background")


def attribute_report(res):
    """Markdown: each attribute's accuracy (the classifier's, on the same captions) for the models at 1-8 steps
    and the ceilings: the shape is asked apart from colour and position."""
    if "attributes" not in res:
        return []
    md = ["Each attribute apart (accuracy of the classifier on the generated images against the caption; the "
          "real test images are the ceiling, their VAE reconstructions the best any model can draw through "
          "this VAE):\n", "| model | steps | " + " | ".join(ATTRS) + " | shape / ceiling |", "|" + "---|" * 8]
    ceiling = next(r for r in res["attributes"] if r["model"] == "real images")["acc_shape"]
    for r in res["attributes"][:2] + [r for r in res["rows"] if r["steps"] in (1, 2, 4, 25)] + res["attributes"][2:]:
        md.append(f"| {r['model']} | {r.get('steps', '-')} | " + " | ".join(f"{r['acc_' + a]:.3f}" for a in ATTRS)
                  + f" | {r['acc_shape'] / ceiling:.2f} |")
    return md + [""]


