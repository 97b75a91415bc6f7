"""Shared test utilities: seeded random weights that keep activations O(1)."""
import os
import signal
import subprocess
import sys
import time

import torch


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights with unit-variance outputs. Norm gains/biases are randomised too, so a
    swapped norm key would show up as an output mismatch."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.normal_(generator=g)
        if p.ndim > 1:  # conv / linear / embedding weight: unit-variance output
            p /= p[0].numel() ** 0.5
        elif name.endswith("weight"):  # GroupNorm / LayerNorm gain around 1
            p.mul_(0.1).add_(1.0)
        else:
            p.mul_(0.1)
    return model


def random_bundle(seed=0, **kw):
    """A tiny SD bundle (sd.create) with seeded random weights everywhere."""
    import sd
    bundle = sd.create(**kw)
    for i, m in enumerate((bundle.unet, bundle.vae, bundle.text_encoder)):
        randomize(m, seed + i).eval()
    return bundle


def write_clip_vocab(path):
    """vocab.json + merges.txt written from our .gz exactly as CLIP builds its vocab (and as HF ships them)."""
    import gzip
    import json
    from clip_text import DEFAULT_BPE, bytes_to_unicode
    merges = gzip.open(DEFAULT_BPE).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return path


def tiny_training_folder(root, n, size, **meta):
    """root/tiny.safetensors (a fresh tiny SD bundle, torch seed 0, `meta` in its metadata) and n random
    size = (H, W) images with .txt captions "a picture number i"; returns (checkpoint, data folder)."""
    import numpy as np
    import sd
    from PIL import Image
    torch.manual_seed(0)
    sd.save(sd.create(), str(root / "tiny.safetensors"), **meta)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a picture number {i}")
    return str(root / "tiny.safetensors"), str(root)


def kill_after_logged(argv, out, lines, env, cwd, timeout=90):
    """Run train.py with argv in a fresh process and SIGKILL it once out/log.jsonl has `lines` complete lines
    (or after `timeout` s). Returns the complete lines logged then (the last may have been cut by the kill)."""
    logged = lambda: (out / "log.jsonl").read_text().count("\n") if os.path.exists(out / "log.jsonl") else 0
    proc = subprocess.Popen([sys.executable, os.path.join(cwd, "train.py"), *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and logged() < lines:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return logged()
