"""Synthetic text-image data: one coloured shape on a plain background, with a caption that names
every visual attribute, e.g. "a small red circle at the top left on a blue background".

Real SD weights are out of reach, so the tiny SD family is trained on this. Every attribute stays
recognisable at 32 px, so a small classifier (metrics.py) can check whether a generated image
follows its prompt: parse_caption() turns a prompt back into the attributes to check.

    7 shapes x 10 colours x 2 sizes x 9 positions x 9 backgrounds (any colour but the shape's)
    = 11_340 distinct captions.

Images are drawn at 4x and box-downsampled (antialiased edges, flat areas keep the exact palette
colour), with a little jitter of position, size and rotation inside each attribute's bin so that
images vary beyond their caption.

Splits. Item i of seed s is drawn from np.random.SeedSequence([s, i]), so different seeds are
independent streams. Seeds below HELDOUT_FROM (= 10_000) are for training: TRAIN_SEED = 0 for the
diffusion data and the metric classifier. VAL_SEED = 10_000 (development checks) and
TEST_SEED = 10_001 (final numbers) are never trained on. The split holds out images, not
captions: with 11_340 captions a large training set contains most of them.

Short prompts. short_caption drops the size and the position phrase of a caption, each with
probability 1 - KEEP_PHRASE, e.g. "a red circle on a blue background": the prior's training
captions vary so (toy/pretrain.py), and so do the reflow demo's prompts (short_prompt, --prompts).

    python toy/synth.py --out data/shapes --n 5000 --size 64 --seed 0
    python toy/synth.py --prompts runs/reflow/prompts.txt --n 4096 --seed 0   # line j: short_prompt(0, j)
"""
import argparse
import itertools
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root's modules: common
import common  # noqa: E402

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "heart")
# Saturated, well separated in RGB, so colour is unambiguous even on antialiased 32 px edges.
PALETTE = {
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (245, 220, 30), "green": (30, 160, 60),
    "cyan": (0, 200, 210), "blue": (30, 70, 220), "purple": (130, 40, 170), "pink": (255, 130, 190),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
COLORS = tuple(PALETTE)
SIZES = ("small", "large")
POSITIONS = ("top left", "top center", "top right", "center left", "center", "center right",
             "bottom left", "bottom center", "bottom right")  # row-major 3x3 grid
ATTRIBUTES = ("shape", "color", "size", "position", "background")
VOCAB = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS, "background": COLORS}

TRAIN_SEED, VAL_SEED, TEST_SEED = 0, 10_000, 10_001
HELDOUT_FROM = 10_000  # seeds >= this are held out: never used to train anything
KEEP_PHRASE = 0.7  # short_caption keeps the size and the position phrase each with this probability

# Geometry in fractions of the image side. A large shape (radius 0.2 + jitter) centred in an edge
# cell (0.24 - jitter) still fits inside the image; small/large radii never overlap under jitter.
_CENTERS = (0.24, 0.5, 0.76)
_RADIUS = {"small": 0.125, "large": 0.2}
_JITTER_POS, _JITTER_SCALE, _JITTER_DEG = 0.025, 0.06, 15.0
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Attributes:
    shape: str
    color: str
    size: str
    position: str
    background: str

    def __post_init__(self):
        for name in ATTRIBUTES:
            if getattr(self, name) not in VOCAB[name]:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}, expected one of {VOCAB[name]}")
        if self.color == self.background:
            raise ValueError(f"shape and background are both {self.color}")

    def labels(self) -> dict[str, int]:
        """Attribute name -> index into VOCAB[name]: the classifier's targets."""
        return {name: VOCAB[name].index(getattr(self, name)) for name in ATTRIBUTES}

    @classmethod
    def from_labels(cls, labels: dict[str, int]) -> "Attributes":
        return cls(**{name: VOCAB[name][int(labels[name])] for name in ATTRIBUTES})


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """Uniform over every attribute; the background is uniform over the other 9 colours."""
    shape, color, size, position = (VOCAB[n][rng.integers(len(VOCAB[n]))] for n in ATTRIBUTES[:4])
    others = [c for c in COLORS if c != color]
    return Attributes(shape, color, size, position, others[rng.integers(len(others))])


def all_attributes():
    """Every valid attribute combination, i.e. every caption the dataset can produce."""
    for combo in itertools.product(*(VOCAB[n] for n in ATTRIBUTES)):
        if combo[1] != combo[4]:
            yield Attributes(*combo)


def caption(attrs: Attributes, size: bool = True, position: bool = True) -> str:
    """The caption naming every attribute; size=False / position=False leave out that phrase."""
    article = "an" if attrs.background[0] in "aeiou" else "a"  # "on an orange background"
    size_phrase = f"{attrs.size} " if size else ""
    where = f" at the {attrs.position}" if position else ""
    return f"a {size_phrase}{attrs.color} {attrs.shape}{where} on {article} {attrs.background} background"


def short_caption(attrs: Attributes, rng, keep: float = KEEP_PHRASE) -> str:
    """caption(attrs) without its size phrase, then its position phrase, each dropped with probability
    1 - keep: exactly two rng.random() draws, size first (rng: a random.Random or np.random.Generator)."""
    size = rng.random() < keep
    position = rng.random() < keep
    return caption(attrs, size, position)


def short_prompt(seed: int, j: int) -> str:
    """Prompt j of stream `seed`: item j's attributes (ShapesDataset(seed)[j]'s caption), then
    short_caption from the same generator, so that short prompts are distilled too (the reflow demo)."""
    rng = item_rng(seed, j)
    return short_caption(sample_attributes(rng), rng)


def _alternatives(words) -> str:
    return "(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_CAPTION_RE = re.compile(
    f"a {_alternatives(SIZES)} {_alternatives(COLORS)} {_alternatives(SHAPES)} "
    f"at the {_alternatives(POSITIONS)} on an? {_alternatives(COLORS)} background")


def parse_caption(text: str) -> Attributes | None:
    """Inverse of caption(); forgiving about case, spacing, a/an and a final full stop. None if the text is
    not a caption this dataset could have written (so a prompt's attributes can be checked)."""
    text = " ".join(text.lower().split()).rstrip(".")
    m = _CAPTION_RE.fullmatch(text)
    if m is None or m[2] == m[5]:
        return None
    size, color, shape, position, background = m.groups()
    return Attributes(shape, color, size, position, background)


# ---------------------------------------------------------------------------------- rendering


def _regular(n: int, radius=1.0, start_deg=-90.0) -> np.ndarray:
    """n points on a circle, the first straight up (image y points down). (n, 2)"""
    a = np.deg2rad(start_deg) + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def _star() -> np.ndarray:
    # Inner radius 0.5 (not the classic 0.38) keeps a solid core wide enough to hold the centre pixel.
    return _regular(10) * np.where(np.arange(10) % 2 == 0, 1.0, 0.5)[:, None]


def _cross() -> np.ndarray:
    w = 0.3  # arm half-width
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
                     (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)], dtype=float)


def _heart() -> np.ndarray:
    # The classic parametric heart; y is negated (image y points down) and it is recentred on its
    # bounding box (y spans about [-17, 12]) and scaled to radius ~1.
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -(y + 2.5)], axis=1) / 16.0


# Unit outlines, centred on (0, 0) with extent ~1, so "radius" means the same for every shape.
_OUTLINES = {
    "circle": _regular(64),
    "square": _regular(4, 0.8 * math.sqrt(2), start_deg=-45.0),  # half side 0.8
    "triangle": _regular(3),
    "diamond": np.array([(0, -1), (0.7, 0), (0, 1), (-0.7, 0)], dtype=float),
    "star": _star(),
    "cross": _cross(),
    "heart": _heart(),
}


def _placement(attrs: Attributes, rng: np.random.Generator | None):
    """Centre (x, y) and radius in fractions of the side, rotation in degrees; jittered if rng given."""
    row, col = divmod(POSITIONS.index(attrs.position), 3)
    cx, cy, r, deg = _CENTERS[col], _CENTERS[row], _RADIUS[attrs.size], 0.0
    if rng is not None:
        cx += rng.uniform(-_JITTER_POS, _JITTER_POS)
        cy += rng.uniform(-_JITTER_POS, _JITTER_POS)
        r *= 1 + rng.uniform(-_JITTER_SCALE, _JITTER_SCALE)
        deg = rng.uniform(-_JITTER_DEG, _JITTER_DEG)
    return cx, cy, r, deg


def render(attrs: Attributes, size: int = 32, rng: np.random.Generator | None = None) -> Image.Image:
    """RGB image of side `size`; rng=None draws the un-jittered canonical image."""
    cx, cy, r, deg = _placement(attrs, rng)
    s = size * _SUPERSAMPLE
    a = np.deg2rad(deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    # Continuous coordinates in big-image pixels; PIL's pixel m is centred at m, hence the -0.5.
    pts = (_OUTLINES[attrs.shape] @ rot.T) * (r * s) + np.array([cx, cy]) * s - 0.5
    img = Image.new("RGB", (s, s), PALETTE[attrs.background])
    ImageDraw.Draw(img).polygon([tuple(p) for p in pts], fill=PALETTE[attrs.color])
    return img.reduce(_SUPERSAMPLE)  # box filter = area average: antialiased, flat colours exact


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float (3, H, W) in [-1, 1], the range the VAE and the classifier take."""
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1


# ---------------------------------------------------------------------------------- datasets


def item_rng(seed: int, i: int) -> np.random.Generator:
    """Item i of seed `seed` depends on (seed, i) only: any subset can be rebuilt in any order."""
    return np.random.default_rng(np.random.SeedSequence([seed, i]))


class ShapesDataset(torch.utils.data.Dataset):
    """Item i: dict(image=(3, size, size) float in [-1, 1], caption=str, labels={attribute: index})."""

    def __init__(self, seed: int = TRAIN_SEED, length: int = 10_000, size: int = 32):
        self.seed, self.length, self.size = seed, length, size

    def __len__(self):
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = item_rng(self.seed, i)
        attrs = sample_attributes(rng)
        image = to_tensor(render(attrs, self.size, rng))
        return dict(image=image, caption=caption(attrs), labels=attrs.labels())


def images(seed: int, start: int, n: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """Items start..start+n-1 of ShapesDataset(seed): images (n, 3, size, size) in [-1, 1], captions."""
    ds = ShapesDataset(seed, start + n, size)
    items = [ds[i] for i in range(start, start + n)]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


def write_prompts(path, n: int, seed: int = TRAIN_SEED) -> str:
    """short_prompt(seed, j) for j = 0..n-1, one a line, written atomically (a killed run leaves no half file)."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with common.atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(short_prompt(seed, j) + "\n" for j in range(n))
    return path


def write_folder(path, n: int, size: int = 64, seed: int = TRAIN_SEED) -> Path:
    """Items 0..n-1 of ShapesDataset(seed) as 00000.png + 00000.txt (caption), plus metadata.jsonl
    with one {"file_name", "text"} line per image (the Hugging Face imagefolder layout)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metadata.jsonl", "w") as meta:
        for i in tqdm(range(n), desc=f"writing {path}"):
            rng = item_rng(seed, i)
            attrs = sample_attributes(rng)
            name, text = f"{i:05d}", caption(attrs)
            render(attrs, size, rng).save(path / f"{name}.png")
            (path / f"{name}.txt").write_text(text + "\n")
            meta.write(json.dumps({"file_name": f"{name}.png", "text": text}) + "\n")
    return path


def read_folder(path) -> tuple[torch.Tensor, list[str]]:
    """Images (N, 3, H, W) in [-1, 1] and captions listed in path/metadata.jsonl (e.g. samples)."""
    path = Path(path)
    rows = [json.loads(line) for line in (path / "metadata.jsonl").read_text().splitlines() if line.strip()]
    images = [to_tensor(Image.open(path / row["file_name"])) for row in rows]
    return torch.stack(images), [row["text"] for row in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a synthetic shapes text-image folder "
                                "(PNG + .txt captions + metadata.jsonl), or with --prompts a prompt file.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="output folder, created if missing")
    what.add_argument("--prompts", metavar="FILE", help="instead: write line j = short_prompt(SEED, j), j < N "
                      "(the reflow demo's prompts: captions that may lack their size / position phrase)")
    p.add_argument("--n", type=int, default=5000, help="number of images, or of prompts (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="--out: image side in pixels (32 or 64 for the tiny "
                   "models) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=TRAIN_SEED, help=f"stream seed: < {HELDOUT_FROM} for "
                   f"training data, {VAL_SEED} validation, {TEST_SEED} test (default: %(default)s)")
    args = p.parse_args(argv)
    if args.prompts:
        if args.n < 1:
            common.usage_error(f"--n must be >= 1 with --prompts, got {args.n}")
        write_prompts(args.prompts, args.n, args.seed)
        print(json.dumps({"prompts": args.prompts, "n": args.n, "seed": args.seed}))
        return args.prompts
    write_folder(args.out, args.n, args.size, args.seed)
    print(json.dumps({"out": args.out, "n": args.n, "size": args.size, "seed": args.seed,
                      "distinct_captions": sum(1 for _ in all_attributes())}))


if __name__ == "__main__":
    main()
