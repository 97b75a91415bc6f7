import json
import math
import random
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


def test_images_are_the_datasets_items():
    x, captions = synth.images(4, 3, 5, 32)
    data = ShapesDataset(4, 8, 32)
    assert x.shape == (5, 3, 32, 32) and captions == [data[i]["caption"] for i in range(3, 8)]
    assert torch.equal(x, torch.stack([data[i]["image"] for i in range(3, 8)]))


# ----------------------------------------------------------------------------- short captions and prompts
# The two functions short_caption replaced, as they were (train.vary_caption, reflow.synth_prompt): the
# prior's captions and the reflow demo's prompts must not change.

def reference_vary_caption(text, rng, keep=0.7):
    a = synth.parse_caption(text)
    size = f"{a.size} " if rng.random() < keep else ""
    where = f" at the {a.position}" if rng.random() < keep else ""
    article = "an" if a.background[0] in "aeiou" else "a"
    return f"a {size}{a.color} {a.shape}{where} on {article} {a.background} background"


def reference_synth_prompt(seed, j):
    rng = synth.item_rng(seed, j)
    a = synth.sample_attributes(rng)
    size = f"{a.size} " if rng.random() < 0.7 else ""
    where = f" at the {a.position}" if rng.random() < 0.7 else ""
    article = "an" if a.background[0] in "aeiou" else "a"
    return f"a {size}{a.color} {a.shape}{where} on {article} {a.background} background"


def test_short_caption_is_vary_caption_with_the_same_draws():
    captions = synth.images(0, 0, 64, 32)[1]
    for keep in (0.7, 0.3):
        ours, ref = random.Random(5), random.Random(5)
        for c in captions:
            assert synth.short_caption(parse_caption(c), ours, keep) == reference_vary_caption(c, ref, keep)
            assert ours.getstate() == ref.getstate(), "two draws per caption, as before"


def test_short_prompt_is_synth_prompt_with_the_same_draws():
    for seed, j in [(0, 0), (0, 1), (3, 17), (10_001, 999)]:
        assert synth.short_prompt(seed, j) == reference_synth_prompt(seed, j)
        ours, ref = synth.item_rng(seed, j), synth.item_rng(seed, j)
        synth.short_caption(sample_attributes(ours), ours)
        sample_attributes(ref), ref.random(), ref.random()  # what synth_prompt drew
        assert ours.bit_generator.state == ref.bit_generator.state


def test_short_captions_keep_every_attribute_they_name():
    rng = random.Random(0)
    full = caption(Attributes("circle", "red", "small", "top left", "blue"))
    seen = {synth.short_caption(parse_caption(full), rng) for _ in range(200)}
    assert seen == {full, "a red circle on a blue background", "a small red circle on a blue background",
                    "a red circle at the top left on a blue background"}


def test_short_prompts_are_captions_with_optional_phrases():
    got = [synth.short_prompt(0, j) for j in range(200)]
    full = [p for p in got if parse_caption(p) is not None]
    assert 0.3 < len(full) / len(got) < 0.7  # both phrases kept with probability 0.7^2 = 0.49
    assert all(p.startswith("a ") and p.endswith(" background") for p in got)


def test_cli_writes_the_reflow_prompt_file_from_anywhere(tmp_path):
    path = tmp_path / "sub" / "prompts.txt"
    subprocess.run([sys.executable, synth.__file__, "--prompts", str(path), "--n", "300", "--seed", "3"],
                   cwd=tmp_path, check=True, capture_output=True)
    assert path.read_text().splitlines() == [reference_synth_prompt(3, j) for j in range(300)]
    assert path.read_text().endswith("\n") and [p.name for p in path.parent.iterdir()] == ["prompts.txt"]
    with pytest.raises(SystemExit) as e:
        synth.main(["--prompts", str(path), "--n", "0"])
    assert e.value.code == 2 and "--n must be >= 1" in str(e.value)
    with pytest.raises(SystemExit):  # one of --out, --prompts
        synth.main(["--n", "3"])
