"""evaluate.py t2i (toy/t2i_eval.py): captions -> resumable, sharded samples -> FID (clean-fid's feature path) and CLIP
score (transformers' CLIPModel), end to end on the tiny demo family with tiny random feature extractors: a
TorchScript file in the Inception's place and a tiny random CLIPModel folder. No weights, no network."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import evaluate
import metrics
import sample
import sd
import t2i_eval
from helpers import write_clip_vocab

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["a red circle on a blue background", "a small green star at the top left on a white background",
            "a large purple cross at the top right on a yellow background", "a blue square", "a yellow triangle"]


class TinyLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 13, stride=13), torch.nn.Linear(8, 2048)

    def forward(self, x):  # (B, 3, 299, 299) normalised by InceptionV3W -> (B, 2048)
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class TinyInception(torch.nn.Module):
    """What InceptionV3W uses of the real TorchScript file: .layers, and forward(x, return_features)."""

    def __init__(self):
        super().__init__()
        self.layers = TinyLayers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    root = tmp_path_factory.mktemp("extractors")
    torch.manual_seed(0)
    torch.jit.script(TinyInception()).save(str(root / t2i_eval.INCEPTION))
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=30, patch_size=10), projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(root / "clip")
    write_clip_vocab(root)
    transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt")).save_pretrained(root / "clip")
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(root / "clip")
    return root


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("real"), np.random.default_rng(0)
    for i in range(6):  # not square: the centre crop makes them so
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / f"{i:012d}.jpg")
    return root


def t2i(tmp_path, extractors, real, *extra):
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    return evaluate.main(["t2i", "--prompts", str(tmp_path / "captions.txt"), "--real", str(real), "--out",
                          str(tmp_path / "out"), "--steps", "1", "--inception", str(extractors / t2i_eval.INCEPTION),
                          "--clip", str(extractors / "clip"), "--batch", "2", *extra])


def test_end_to_end_then_resumed(tmp_path, extractors, real):
    res = t2i(tmp_path, extractors, real, "--n", "4")
    assert res["images"] == 4 and res["sampled_by_rank0"] == 4 and res["real_images"] == 6
    assert res["fid"] > 0 and 0 <= res["clip_score"] <= 100
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == res
    images = sorted(os.listdir(tmp_path / "out" / "images"))
    assert images == [f"{i:06d}.png" for i in range(4)]
    stamp = os.stat(tmp_path / "out" / "images" / "000000.png").st_mtime_ns
    os.remove(tmp_path / "out" / "images" / "000002.png")
    again = t2i(tmp_path, extractors, real, "--n", "4")
    assert again["sampled_by_rank0"] == 1 and os.stat(tmp_path / "out" / "images" / "000000.png").st_mtime_ns == stamp
    assert again["fid"] == pytest.approx(res["fid"], rel=1e-6)  # the resampled image is the same image
    assert again["clip_score"] == pytest.approx(res["clip_score"], rel=1e-6)


def test_shards_write_disjoint_indices_and_the_same_images(tmp_path):
    bundle = sd.load(sample.DEMO)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    t2i_eval.sample_captions(bundle, CAPTIONS, one, (32, 32), 1, 1.0, batch=4)
    assert t2i_eval.sample_captions(bundle, CAPTIONS, two, (32, 32), 1, 1.0, rank=1, world=2) == 2
    assert sorted(os.listdir(os.path.join(two, "images"))) == ["000001.png", "000003.png"]
    assert t2i_eval.sample_captions(bundle, CAPTIONS, two, (32, 32), 1, 1.0, rank=0, world=2) == 3
    for i in range(len(CAPTIONS)):  # noise seed + i: the same image in any batch, on any rank
        a, b = (np.asarray(Image.open(t2i_eval.image_path(d, i))).astype(int) for d in (one, two))
        assert np.abs(a - b).max() <= 1


def test_gram_frechet_distance_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 50, generator=g, dtype=torch.float64), torch.randn(9, 50, generator=g, dtype=torch.float64) + 0.3
    # rel 1e-7: the D x D route takes square roots of ~1e-16 rounding eigenvalues of the rank-6 covariance
    assert t2i_eval.frechet_distance(a, b) == pytest.approx(metrics.frechet_distance(a, b), rel=1e-7)
    assert t2i_eval.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)


def test_coco_annotations_give_the_first_caption_of_each_image(tmp_path):
    ann = {"images": [{"id": 9}, {"id": 3}], "annotations": [
        {"image_id": 9, "id": 5, "caption": "later"}, {"image_id": 9, "id": 2, "caption": " first of nine "},
        {"image_id": 3, "id": 7, "caption": "three"}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(ann))
    assert t2i_eval.read_captions(str(tmp_path / "captions_val2017.json")) == ["three", "first of nine"]


def test_missing_weights_are_one_line_naming_the_download(tmp_path, extractors, real, capsys):
    with pytest.raises(SystemExit) as e:
        t2i(tmp_path, extractors, real, "--n", "1", "--inception", str(tmp_path / t2i_eval.INCEPTION))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and t2i_eval.INCEPTION_URL in err
    with pytest.raises(SystemExit) as e:
        t2i(tmp_path, extractors, real, "--n", "1", "--no-fid", "--clip", str(tmp_path / "no-clip"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and "huggingface-cli download openai/clip-vit-large-patch14" in err
