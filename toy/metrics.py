"""Image metrics for synth.py data that need no downloaded network: the FID and CLIP-score analogues.

A small CNN that we train on real synthetic images only (train_classifier) has one softmax head per
attribute (shape, colour, size, position, background). It gives two numbers for generated images:

  prompt following (CLIP-score analogue)  attribute_accuracy against the attributes parsed from each
                                          image's prompt (synth.parse_caption); chance is ~1/classes.
  sample quality (FID analogue)           frechet_distance between its penultimate 128-d features of
                                          generated and held-out real images (fd_score).

Like FID, FD is biased upwards at small sample counts: compare only numbers computed with the same
n and the same classifier file. Measured with the defaults (1500 steps of 64 images at 32 px, about
2 min on one core): 100% held-out accuracy on every attribute; FD at n = 2000 between validation
and test images 8.6, against pixel-shuffled test images 1616, against uniform noise 2624.

    python toy/metrics.py train --size 32 --steps 1500 --out runs/classifier32.safetensors
    python toy/metrics.py eval --classifier runs/classifier32.safetensors --folder out/samples
"""
import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: common
import common  # noqa: E402
import synth  # noqa: E402

# ---------------------------------------------------------------------------------- RESULTS.md


def update_results(path, section: str, markdown: str):
    """Replace (or append) one section of RESULTS.md, so that toy/evaluate.py's reproduce, reflow and depth
    each rewrite their own part: between <!-- begin SECTION --> and <!-- end SECTION -->."""
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}\n"
    path = Path(path)
    text = path.read_text() if path.exists() else "# Results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")  # the prose after a section stays a paragraph
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with common.atomic_path(str(path)) as tmp:  # a crash never leaves half a file
        Path(tmp).write_text(text)


# ---------------------------------------------------------------------------------- Frechet distance


def gaussian_stats(feats) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    x = torch.as_tensor(feats, dtype=torch.float64)
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (len(x) - 1)


def _sym(m: torch.Tensor) -> torch.Tensor:
    return (m + m.T) / 2  # remove rounding asymmetry so eigh sees an exactly symmetric matrix


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(_sym(m))
    return (v * w.clamp(min=0).sqrt()) @ v.T  # tiny negative eigenvalues are rounding: clamp to 0


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """|mu_a - mu_b|^2 + tr(A + B - 2 (A B)^1/2), the Frechet (W2) distance of two Gaussians.

    tr (A B)^1/2 = tr (A^1/2 B A^1/2)^1/2: AB is similar to A^1/2 B A^1/2, which is symmetric PSD, so
    its eigenvalues come from eigh, real and stable in float64 even for rank-deficient covariances
    (where sqrtm of the non-symmetric AB returns complex noise and needs an eps offset)."""
    mu_a, cov_a, mu_b, cov_b = (torch.as_tensor(t, dtype=torch.float64) for t in (mu_a, cov_a, mu_b, cov_b))
    sqrt_a = _psd_sqrt(cov_a)
    tr_cross = torch.linalg.eigvalsh(_sym(sqrt_a @ cov_b @ sqrt_a)).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_cross)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


# ---------------------------------------------------------------------------------- classifier


@dataclass
class ClassifierConfig:
    size: int = 32  # input side; images of another size are resized to it (antialiased)
    width: int = 16  # channels of the first stage, 2x and 4x after
    features: int = 128  # penultimate width: the space FD is measured in


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _with_cues(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 6, H, W): RGB, silhouette, x and y coordinates in [-1, 1].

    The background fills most of the image, so the per-channel median is its colour and
    |x - median| summed over RGB is the shape's mask whatever its colour: shape and size need no
    colour-specific filters (a few hundred steps instead of thousands). The coordinates let features
    say where they fired, which survives the global max pool and is what the position head reads."""
    b, _, h, w = x.shape
    silhouette = (x - x.flatten(2).median(2).values[..., None, None]).abs().sum(1, keepdim=True)
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, silhouette, xs, ys], 1)


class AttributeClassifier(nn.Module):
    """Conv stages at size, size/2, size/4, a global max pool, 128-d features, one head per attribute.
    The max pool is translation invariant, right for shape, colour and size, which look the same
    anywhere; position comes from the coordinate channels (_with_cues)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.body = nn.Sequential(
            _block(6, w), _block(w, w),  # (B, w, S, S)
            _block(w, 2 * w, 2), _block(2 * w, 2 * w),  # (B, 2w, S/2, S/2)
            _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w))  # (B, 4w, S/4, S/4)
        self.proj = nn.Sequential(nn.Linear(4 * w, cfg.features), nn.ReLU())
        self.heads = nn.ModuleDict({n: nn.Linear(cfg.features, len(synth.VOCAB[n])) for n in synth.ATTRIBUTES})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> penultimate features (B, features)."""
        if x.shape[-2:] != (self.cfg.size, self.cfg.size):
            x = F.interpolate(x, size=(self.cfg.size, self.cfg.size), mode="bilinear", antialias=True)
        return self.proj(self.body(_with_cues(x)).amax((2, 3)))  # (B, 4w) after the pool

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}  # name -> logits (B, classes)


def real_images(seed: int, n: int, size: int, start: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Items start..start+n-1 of ShapesDataset(seed): images (n, 3, size, size), labels {name: (n,)}."""
    data = synth.ShapesDataset(seed, start + n, size)
    batch = default_collate([data[i] for i in range(start, start + n)])
    return batch["image"], batch["labels"]


def train_classifier(size: int = 32, steps: int = 1500, seed: int = synth.TRAIN_SEED, batch: int = 64,
                     width: int = 16, lr: float = 2e-3) -> AttributeClassifier:
    """Train on a fresh batch of real images every step (an endless stream: nothing to overfit, no
    augmentation needed), sum of the per-attribute cross-entropies, AdamW with cosine decay."""
    if seed >= synth.HELDOUT_FROM:
        raise ValueError(f"seed {seed} is held out (>= {synth.HELDOUT_FROM}); train on a lower one")
    torch.manual_seed(seed)
    model = AttributeClassifier(ClassifierConfig(size=size, width=width)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for step in (bar := tqdm(range(steps), desc="classifier", mininterval=2)):
        images, labels = real_images(seed, batch, size, start=step * batch)
        logits = model(images)
        loss = sum(F.cross_entropy(logits[n], labels[n]) for n in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def save_classifier(model: AttributeClassifier, path, **info):
    """Weights as safetensors; the config (and any JSON-able info, e.g. accuracy) in its metadata."""
    meta = {"config": json.dumps(asdict(model.cfg)), **{k: json.dumps(v) for k, v in info.items()}}
    save_file(model.state_dict(), str(path), metadata=meta)


def load_classifier(path) -> AttributeClassifier:
    with safe_open(str(path), "pt") as f:
        cfg = ClassifierConfig(**json.loads(f.metadata()["config"]))
    model = AttributeClassifier(cfg)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# ---------------------------------------------------------------------------------- scores


@torch.no_grad()
def _batched(model: AttributeClassifier, fn, images: torch.Tensor, batch: int = 256) -> list:
    """fn over chunks of images moved to the model's device, in eval mode (BatchNorm's running stats)."""
    model.eval()
    device = next(model.parameters()).device
    return [fn(images[i:i + batch].to(device, torch.float32)) for i in range(0, len(images), batch)]


def extract_features(model: AttributeClassifier, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> features (N, features) on the CPU."""
    return torch.cat(_batched(model, lambda x: model.features(x).cpu(), images))


def predict(model: AttributeClassifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Images (N, 3, H, W) in [-1, 1] -> {attribute: predicted class index (N,)} on the CPU."""
    parts = _batched(model, lambda x: {n: logits.argmax(1).cpu() for n, logits in model(x).items()}, images)
    return {n: torch.cat([p[n] for p in parts]) for n in model.heads}


def attribute_accuracy(model: AttributeClassifier, images: torch.Tensor, labels) -> dict[str, float]:
    """Fraction of images whose predicted class matches labels[name] (N,), per attribute, and "mean"
    over the attributes given."""
    pred = predict(model, images)
    acc = {n: (pred[n] == torch.as_tensor(labels[n])).float().mean().item() for n in labels}
    return {**acc, "mean": sum(acc.values()) / len(acc)}


def fd_score(model: AttributeClassifier, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Frechet distance between the classifier features of two image sets (N, 3, H, W) in [-1, 1]."""
    return frechet_distance(extract_features(model, images_a), extract_features(model, images_b))


def shuffle_pixels(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image's pixels in a random order: same colour histogram, no shapes. A sanity negative."""
    g = torch.Generator().manual_seed(seed)
    flat = images.flatten(2)  # (N, 3, H*W)
    idx = torch.stack([torch.randperm(flat.shape[-1], generator=g) for _ in range(len(images))])
    return flat.gather(2, idx[:, None].expand_as(flat)).view_as(images)


# ---------------------------------------------------------------------------------- held-out measurement
# What the fine-tuning (toy/evaluate.py reproduce) and the reflow evaluation both score against.


def cached_classifier(folder, steps: int) -> AttributeClassifier:
    """The 32 px classifier of `steps` training steps, trained once into folder/classifier32-STEPS.safetensors."""
    path = os.path.join(folder, f"classifier32-{steps}.safetensors")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        with common.atomic_path(path) as tmp:  # a killed run leaves no half classifier to load next time
            save_classifier(train_classifier(32, steps), tmp)
    return load_classifier(path)


def held_out(bundle, resolution: int, n_eval: int, n_val: int) -> dict:
    """Validation latents + contexts (x1, val_ctx: the FM loss) and test images, contexts and labels (test,
    test_ctx, labels: FD, accuracy) of synth.py's held-out seeds, encoded by bundle (an sd.SD)."""
    val, val_caps = synth.images(synth.VAL_SEED, 0, n_val, resolution)
    test, test_caps = synth.images(synth.TEST_SEED, 0, n_eval, resolution)
    labels = default_collate([synth.parse_caption(c).labels() for c in test_caps])
    with torch.no_grad():
        return dict(x1=bundle.vae.encode(val), val_ctx=bundle.encode_prompt(val_caps), test=test,
                    test_ctx=bundle.encode_prompt(test_caps), labels=labels)


def image_scores(model: AttributeClassifier, images: torch.Tensor, data: dict) -> dict[str, float]:
    """FD against held_out's test images, the mean accuracy of their captions' attributes and each attribute's
    (acc_shape, acc_color, ...)."""
    acc = attribute_accuracy(model, images, data["labels"])
    return {"fd": fd_score(model, images, data["test"]), "acc": acc["mean"],
            **{f"acc_{k}": v for k, v in acc.items() if k != "mean"}}


# ---------------------------------------------------------------------------------- CLI


def _heldout_report(model: AttributeClassifier, n: int) -> dict:
    """Accuracy on validation images and FD sanity checks against held-out test images."""
    val, val_labels = real_images(synth.VAL_SEED, n, model.cfg.size)
    test, _ = real_images(synth.TEST_SEED, n, model.cfg.size)
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"val_accuracy": attribute_accuracy(model, val, val_labels),
            "fd_val_vs_test": fd_score(model, val, test),
            "fd_val_vs_shuffled_pixels": fd_score(model, val, shuffle_pixels(test)),
            "fd_val_vs_noise": fd_score(model, val, noise)}


def _eval_folder(model: AttributeClassifier, folder: str, ref_seed: int) -> dict:
    """Prompt following (accuracy against parsed captions) and FD against n real reference images."""
    images, captions = synth.read_folder(folder)
    attrs = [synth.parse_caption(c) for c in captions]
    keep = [i for i, a in enumerate(attrs) if a is not None]
    labels = default_collate([attrs[i].labels() for i in keep]) if keep else None
    ref, _ = real_images(ref_seed, len(images), images.shape[-1])
    return {"n": len(images), "n_parsed": len(keep), "fd": fd_score(model, images, ref),
            "accuracy": attribute_accuracy(model, images[keep], labels) if keep else None}


def main():
    p = argparse.ArgumentParser(description="Train the attribute classifier behind the metrics, or score "
                                "a folder of generated images (metadata.jsonl with file_name, text).")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train on real images, report held-out accuracy and FD sanity checks")
    t.add_argument("--size", type=int, default=32, help="classifier input side (32 is plenty)")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--width", type=int, default=16)
    t.add_argument("--seed", type=int, default=synth.TRAIN_SEED, help=f"must be < {synth.HELDOUT_FROM}")
    t.add_argument("--n-eval", type=int, default=2000, help="held-out images for the report")
    t.add_argument("--out", required=True, help="where to write the .safetensors")
    e = sub.add_parser("eval", help="accuracy vs parsed prompts and FD vs held-out real images")
    e.add_argument("--classifier", required=True)
    e.add_argument("--folder", required=True, help="images + metadata.jsonl, as synth.write_folder writes")
    e.add_argument("--ref-seed", type=int, default=synth.TEST_SEED, help="seed of the real reference images")
    for sp in (t, e):
        sp.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.cmd == "train":
        model = train_classifier(args.size, args.steps, args.seed, args.batch, args.width)
        report = _heldout_report(model, args.n_eval)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_classifier(model, args.out, steps=args.steps, seed=args.seed, **report)
    else:
        report = _eval_folder(load_classifier(args.classifier), args.folder, args.ref_seed)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
