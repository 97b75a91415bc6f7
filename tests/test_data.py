import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError, FolderDataset, epoch_order, load_image, stream_indices


def save_image(path, h=40, w=48, seed=0, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(path)


def txt_folder(root, n=4):
    for i in range(n):
        save_image(os.path.join(root, f"img{i}.png"), seed=i)
        with open(os.path.join(root, f"img{i}.txt"), "w") as f:
            f.write(f"  caption {i}\n")
    return root


def test_txt_captions(tmp_path):
    ds = FolderDataset(txt_folder(str(tmp_path)), 32)
    assert len(ds) == 4 and [ds.caption(i) for i in range(4)] == [f"caption {i}" for i in range(4)]  # sorted, stripped
    x, caption = ds[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and caption == "caption 2"
    assert -1 <= x.min() < -0.9 and 0.9 < x.max() <= 1  # uint8 0..255 -> [-1, 1]


def test_metadata_jsonl(tmp_path):
    save_image(str(tmp_path / "sub" / "a.png"))
    save_image(str(tmp_path / "b.jpg"), seed=1)
    rows = [{"file_name": "sub/a.png", "text": "first"}, {"file_name": "b.jpg", "text": "second", "extra": 1}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for path in (tmp_path, tmp_path / "metadata.jsonl"):  # the folder or the file itself
        ds = FolderDataset(str(path), 16)
        assert len(ds) == 2 and ds.captions == ["first", "second"] and ds[1][0].shape == (3, 16, 16)


def test_resize_shorter_side_then_center_crop(tmp_path):
    # 64 wide x 32 high: red | green (middle half) | blue. Shorter side -> 16, width -> 32, crop the middle 16.
    rgb = np.zeros((32, 64, 3), dtype=np.uint8)
    rgb[:, :16, 0], rgb[:, 16:48, 1], rgb[:, 48:, 2] = 255, 255, 255
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    x = load_image(str(tmp_path / "wide.png"), 16)
    assert x.shape == (3, 16, 16)
    inner = x[:, :, 2:-2]  # bicubic blends one or two pixels at the colour edges
    assert torch.allclose(inner[1], torch.ones(()), atol=0.02) and (inner[[0, 2]] < -0.95).all(), "center not kept"
    Image.fromarray(rgb.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")  # 32 wide x 64 high
    assert torch.allclose(load_image(str(tmp_path / "tall.png"), 16)[:, 2:-2], inner.transpose(1, 2), atol=0.02)


def test_modes_become_rgb_and_transparency_white(tmp_path):
    save_image(str(tmp_path / "gray.png"), mode="L")
    save_image(str(tmp_path / "pal.png"), mode="P")
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # fully transparent red
    for name in ("gray.png", "pal.png", "clear.png"):
        assert load_image(str(tmp_path / name), 16).shape == (3, 16, 16)
    gray = load_image(str(tmp_path / "gray.png"), 16)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(load_image(str(tmp_path / "clear.png"), 16), torch.ones(3, 16, 16)), "transparent -> white"


def test_missing_captions_are_named(tmp_path):
    txt_folder(str(tmp_path), 3)
    os.remove(tmp_path / "img1.txt")
    with pytest.raises(DataError, match=r"1 of 3 images have no caption: img1\.png"):
        FolderDataset(str(tmp_path), 32)


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "notes.md").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        FolderDataset(str(tmp_path), 32)
    with pytest.raises(DataError, match="no such folder"):
        FolderDataset(str(tmp_path / "nope"), 32)


def test_resolution_must_be_positive(tmp_path):
    # what a model needs (a multiple of its downsampling) train.py checks against the model (test_train.py)
    with pytest.raises(DataError, match="resolution 0 must be >= 1"):
        FolderDataset(txt_folder(str(tmp_path), 1), 0)


def corrupt(path, kind):
    if kind == "garbage":
        with open(path, "wb") as f:
            f.write(b"this is not an image")
    else:  # a truncated JPEG: its header is fine, the pixels stop halfway
        save_image(path.replace(".png", ".jpg"), h=64, w=64)
        data = open(path.replace(".png", ".jpg"), "rb").read()
        os.remove(path.replace(".png", ".jpg"))
        with open(path, "wb") as f:  # a JPEG named .png: PIL goes by content, not by name
            f.write(data[: len(data) // 2])


def read_all(ds, batch_size=2):
    """What training reads: every index once, in order, through FolderDataset.item, collate and Skips."""
    skips = data.Skips(ds.root, len(ds))
    batches = [skips(data.collate([ds.item(i) for i in range(j, min(j + batch_size, len(ds)))]))
               for j in range(0, len(ds), batch_size)]
    return batches, skips


def test_listing_opens_no_image(tmp_path, monkeypatch):
    txt_folder(str(tmp_path), 3)
    corrupt(str(tmp_path / "img1.png"), "garbage")
    opened = []
    monkeypatch.setattr(data, "open_rgb", lambda *a: opened.append(a))
    monkeypatch.setattr(data, "read_text", lambda *a: opened.append(a))
    assert len(FolderDataset(str(tmp_path), 32)) == 3 and opened == [], "start-up must cost the listing only"


def test_a_few_corrupt_images_are_skipped_when_met_named_and_counted(tmp_path):
    txt_folder(str(tmp_path), 24)  # 2 of 26 read unreadable: under MAX_BAD (10%)
    corrupt(str(tmp_path / "img1.png"), "garbage")
    corrupt(str(tmp_path / "img4.png"), "truncated")
    ds = FolderDataset(str(tmp_path), 32)
    with pytest.warns(UserWarning) as w:
        batches, skips = read_all(ds)
    assert [str(x.message).split(": ")[0] for x in w] == [str(tmp_path / "img1.png"), str(tmp_path / "img4.png")]
    assert all("unreadable" in str(x.message) for x in w) and skips.counts == {"skipped": 2}
    # each takes the next readable image's place (the same every run): img2 for img1, img5 for img4
    ds_order = [int(os.path.basename(ds.file(i))[3:-4]) for i in range(24)]  # sorted names: img0, img1, img10, ...
    want = [ds_order[i + (ds_order[i] in (1, 4))] for i in range(24)]
    assert [int(c.split()[1]) for b in batches for c in b["caption"]] == want


def test_mostly_corrupt_is_an_error_naming_files(tmp_path):
    txt_folder(str(tmp_path), 4)
    for i in (0, 1):
        corrupt(str(tmp_path / f"img{i}.png"), "garbage")
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"3 of the 5 images read so far are unreadable "
                                                  r"\(over 10%\): .*img0\.png, .*img1\.png; .*python data\.py check"):
        read_all(FolderDataset(str(tmp_path), 32))  # img0 -> img1 -> img2, then img1 -> img2: stop


def test_check_decodes_everything_and_names_the_bad_files(tmp_path, capsys):
    txt_folder(str(tmp_path), 4)
    corrupt(str(tmp_path / "img2.png"), "truncated")
    with pytest.raises(SystemExit, match=r"1 unusable of 4 items"):
        data.main(["check", str(tmp_path)])
    assert f"{tmp_path / 'img2.png'}: unreadable" in capsys.readouterr().out
    os.remove(tmp_path / "img2.png")
    data.main(["check", str(tmp_path)])
    assert "all 3 items usable" in capsys.readouterr().out


def test_jsonl_errors_name_the_line(tmp_path):
    save_image(str(tmp_path / "a.png"))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png"}\n')
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: caption missing"):
        FolderDataset(str(tmp_path), 32)
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"metadata\.jsonl:1: not a JSON object"):
        FolderDataset(str(tmp_path), 32)


def test_stream_is_deterministic_resumable_and_reshuffled():
    n = 7
    full = stream_indices(n, seed=3, start=0, count=30)
    assert full == stream_indices(n, 3, 0, 11) + stream_indices(n, 3, 11, 19), "a position must resume exactly"
    epochs = [full[i:i + n] for i in range(0, 28, n)]
    assert all(sorted(e) == list(range(n)) for e in epochs), "each epoch visits every item once"
    assert len({tuple(e) for e in epochs}) == 4, "each epoch has its own order"
    assert epoch_order(n, 3, 0) != epoch_order(n, 4, 0), "the seed changes the order"
