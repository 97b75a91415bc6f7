import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import synth
from synth import (ATTRIBUTES, COLORS, PALETTE, VOCAB, Attributes, ShapesDataset, all_attributes,
                   caption, parse_caption, read_folder, render, sample_attributes, write_folder)


def test_caption_count_and_injective():
    """>= 10^4 distinct captions, by construction (product of the choices) and by enumeration."""
    by_product = math.prod(len(VOCAB[n]) for n in ATTRIBUTES) * (len(COLORS) - 1) // len(COLORS)
    captions = [caption(a) for a in all_attributes()]
    assert len(captions) == by_product == 11_340
    assert len(set(captions)) == len(captions), "caption() must be injective"


def test_parse_caption_inverts_caption():
    for attrs in all_attributes():
        assert parse_caption(caption(attrs)) == attrs
    assert caption(Attributes("star", "red", "small", "top left", "orange")).endswith("on an orange background")
    assert parse_caption("A Small red circle at the  top left on a blue background.") == Attributes(
        "circle", "red", "small", "top left", "blue")


@pytest.mark.parametrize("text", [
    "a photo of a cat",
    "a small red circle at the top left on a red background",  # background = shape colour: never written
    "a tiny red circle at the top left on a blue background",
    "a small red circle at the top left on a blue background and a dog",
])
def test_parse_caption_rejects(text):
    assert parse_caption(text) is None


def test_attributes_validate_and_labels_roundtrip():
    with pytest.raises(ValueError):
        Attributes("circle", "red", "small", "top left", "red")
    with pytest.raises(ValueError):
        Attributes("blob", "red", "small", "top left", "blue")
    a = Attributes("heart", "pink", "large", "bottom right", "black")
    assert Attributes.from_labels(a.labels()) == a


def test_sample_attributes_covers_vocab():
    rng = np.random.default_rng(0)
    seen = {n: set() for n in ATTRIBUTES}
    for _ in range(2000):
        a = sample_attributes(rng)
        assert a.color != a.background
        for n in ATTRIBUTES:
            seen[n].add(getattr(a, n))
    assert all(seen[n] == set(VOCAB[n]) for n in ATTRIBUTES)


@pytest.mark.parametrize("size", [32, 64])
def test_dataset_deterministic_by_seed(size):
    a, b, c = ShapesDataset(0, 8, size), ShapesDataset(0, 8, size), ShapesDataset(1, 8, size)
    for i in (0, 5, 7):
        x, y = a[i], b[i]
        assert x["image"].shape == (3, size, size) and x["image"].dtype == torch.float32
        assert -1 <= x["image"].min() and x["image"].max() <= 1
        assert torch.equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["labels"] == y["labels"]
        assert parse_caption(x["caption"]).labels() == x["labels"]
    # Item i depends on (seed, i) only, not on what was read before.
    assert torch.equal(ShapesDataset(0, 8, size)[7]["image"], a[7]["image"])
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(8))
    assert [a[i]["caption"] for i in range(8)] != [c[i]["caption"] for i in range(8)]
    with pytest.raises(IndexError):
        a[8]


def test_jitter_varies_images_of_one_caption():
    attrs = Attributes("square", "blue", "large", "center", "yellow")
    imgs = [np.asarray(render(attrs, 32, np.random.default_rng(s))) for s in range(3)]
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[1], imgs[2])


def _nearest_colour(rgb) -> str:
    return min(COLORS, key=lambda c: sum((int(p) - q) ** 2 for p, q in zip(rgb, PALETTE[c])))


@pytest.mark.parametrize("size", [32, 64])
def test_pixels_match_attributes(size):
    """At the nominal centre of the position bin the pixel is the shape colour (exact without jitter,
    nearest palette colour with jitter); the corners show the background (no shape reaches the
    opposite corner); a large shape covers more pixels than a small one."""
    rng = np.random.default_rng(1)
    for _ in range(150):
        a = sample_attributes(rng)
        row, col = divmod(synth.POSITIONS.index(a.position), 3)
        y, x = (int(synth._CENTERS[k] * size) for k in (row, col))
        exact = np.asarray(render(a, size))
        jittered = np.asarray(render(a, size, rng))
        assert tuple(exact[y, x]) == PALETTE[a.color], a
        assert _nearest_colour(jittered[y, x]) == a.color, a
        far = (size - 1 if row < 2 else 0, size - 1 if col < 2 else 0)
        assert tuple(jittered[far]) == PALETTE[a.background], a


def test_size_attribute_changes_area():
    for shape in synth.SHAPES:
        area = {s: (np.asarray(render(Attributes(shape, "red", s, "center", "black"), 32))[..., 0] > 100).sum()
                for s in synth.SIZES}
        assert area["large"] > 2 * area["small"], (shape, area)


def test_write_and_read_folder(tmp_path):
    out = write_folder(tmp_path / "shapes", n=6, size=32, seed=3)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    data = ShapesDataset(3, 6, 32)
    assert [r["file_name"] for r in rows] == [f"{i:05d}.png" for i in range(6)]
    for i, row in enumerate(rows):
        txt = (out / row["file_name"]).with_suffix(".txt").read_text().strip()
        assert txt == row["text"] == data[i]["caption"]
        assert Image.open(out / row["file_name"]).size == (32, 32)
    images, captions = read_folder(out)
    assert captions == [r["text"] for r in rows]
    # PNG is lossless: the folder holds exactly the dataset's images.
    assert torch.equal(images, torch.stack([data[i]["image"] for i in range(6)]))


def test_cli_writes_folder(tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "synth.py", "--out", str(out), "--n", "3", "--size", "32", "--seed", "5"],
                   cwd=Path(synth.__file__).parent, check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00000.txt", "00001.png", "00001.txt",
                                                     "00002.png", "00002.txt", "metadata.jsonl"]
    assert read_folder(out)[1] == [ShapesDataset(5, 3, 32)[i]["caption"] for i in range(3)]
