"""Tar shards (issue #15): webdataset / img2dataset layout read as streams, split over processes and DataLoader
workers with no overlap and no gap, resumed exactly (also after kill -9), damaged members and cut shards skipped
by name and counted, bad input named in one line; --cache written to disk shards, each by one process."""
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import train
from helpers import kill_after_logged, random_bundle

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


def add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def jpeg(seed, size=(12, 16)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shards(folder, n_shards, per_shard, size=(12, 16), caption=True):
    """n_shards tar files of per_shard items KEY.jpg + KEY.txt (+ KEY.json), keys 000000, 000001, ..."""
    os.makedirs(folder, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                add(tar, f"{i:06d}.jpg", jpeg(i, size))
                if caption:
                    add(tar, f"{i:06d}.txt", f"a picture number {i}".encode())
                add(tar, f"{i:06d}.json", json.dumps({"key": i}).encode())
    return str(folder)


def keys_of(batch):
    return [int(c.split()[-1]) for c in batch["caption"]]


def stream(shards, rank=0, world=1, workers=0, start=0, batch_size=3, seed=0):
    ds = data.ShardStream(shards, seed, batch_size, rank, world, workers, start,
                          lambda shard, key, group: data.shard_record(8, shard, key, group), data.t2i_valid)
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))


def test_listing_a_folder_a_file_and_brace_patterns(tmp_path):
    folder = write_shards(tmp_path / "s", 3, 1)
    names = [os.path.join(folder, f"{i:05d}.tar") for i in range(3)]
    assert data.list_shards(folder) == names and data.list_shards(names[1]) == [names[1]]
    assert data.list_shards(os.path.join(folder, "{00000..00002}.tar")) == names
    assert data.expand_braces("a{0..1}/{x,y}.tar") == ["a0/x.tar", "a0/y.tar", "a1/x.tar", "a1/y.tar"]
    assert data.expand_braces("{8..10}") == ["8", "9", "10"] and data.expand_braces("{08..10}") == ["08", "09", "10"]
    assert data.list_shards(str(tmp_path)) is None  # no .tar in it: a folder of images
    assert data.split_key("d/0001.rgb.PNG") == ("d/0001", "rgb.png")


def test_readers_split_the_shards_of_every_epoch_with_no_overlap_and_no_gap():
    for n_shards in (4, 7, 64):
        for epoch in range(3):
            parts = [data.slot_shards(n_shards, 5, epoch, s, 4) for s in range(4)]  # 2 ranks x 2 workers
            flat = [i for p in parts for i in p]
            assert sorted(flat) == list(range(n_shards)), (n_shards, epoch, parts)
    assert data.slot_shards(64, 5, 0, 0, 4) != data.slot_shards(64, 5, 1, 0, 4), "each epoch its own order"


def test_two_ranks_x_two_workers_read_every_item_once_per_epoch_and_resume_exactly(tmp_path):
    """8 shards x 3 items, 2 processes x 2 DataLoader workers = 4 readers of 2 shards (6 items) each: per epoch,
    each process takes 4 micro-batches of 3; together they are the 24 items, each once. A process started at
    micro-batch 3 (a resume) gives the batches the first one gave from there."""
    shards = data.list_shards(write_shards(tmp_path / "s", 8, 3))
    seen = {}
    for rank in (0, 1):
        it = stream(shards, rank, 2, workers=2)
        seen[rank] = [keys_of(next(it)) for _ in range(8)]  # two epochs
        again = stream(shards, rank, 2, workers=2, start=3)
        assert [keys_of(next(again)) for _ in range(5)] == seen[rank][3:], "resume must repeat the stream"
    for epoch in (0, 1):
        items = [k for rank in (0, 1) for b in seen[rank][4 * epoch:4 * epoch + 4] for k in b]
        assert sorted(items) == list(range(24)), f"epoch {epoch}: overlap or gap: {items}"
    assert seen[0][:4] != seen[0][4:], "the second epoch reads the shards in another order"


def damage(folder):
    """Shard 1: item 4's JPEG is garbage; shard 2: cut in the middle of its second item."""
    with tarfile.open(os.path.join(folder, "00001.tar"), "w") as tar:
        for i in range(3, 6):
            add(tar, f"{i:06d}.jpg", b"not a jpeg" if i == 4 else jpeg(i))
            add(tar, f"{i:06d}.txt", f"a picture number {i}".encode())
    path = os.path.join(folder, "00002.tar")
    with tarfile.open(path) as tar:
        cut = tar.getmember("000007.jpg").offset_data + 100
    open(path, "r+b").truncate(cut)


def test_a_corrupt_member_and_a_cut_shard_are_skipped_by_name_and_counted(tmp_path):
    folder = write_shards(tmp_path / "s", 4, 3)
    damage(folder)
    shards, skips = data.list_shards(folder), data.Skips(folder)
    with pytest.warns(UserWarning) as w:
        batches = [skips(next(it)) for it in [stream(shards, batch_size=2)] for _ in range(5)]  # one epoch: 10
    lines = [str(x.message) for x in w]
    assert any(line.startswith(os.path.join(folder, "00001.tar") + ": 000004.jpg: unreadable") for line in lines)
    assert any(line.startswith(os.path.join(folder, "00002.tar") + ": cut short") for line in lines), lines
    assert skips.counts == {"skipped": 1, "cut_shards": 1}
    items = sorted(k for b in batches for k in keys_of(b))  # 4's place goes to another item of its batch
    assert set(items) == set(range(12)) - {4, 7, 8} and len(items) == 10, items


def test_mostly_unreadable_shards_stop_with_an_error_naming_files(tmp_path):
    folder = write_shards(tmp_path / "s", 2, 2)
    with tarfile.open(os.path.join(folder, "00000.tar"), "w") as tar:
        for i in range(60):
            add(tar, f"{i:06d}.jpg", jpeg(i) if i % 3 == 0 else b"junk")
            add(tar, f"{i:06d}.txt", f"a picture number {i}".encode())
    skips, it = data.Skips(folder), stream(data.list_shards(folder), batch_size=8, seed=1)
    with pytest.warns(UserWarning), pytest.raises(data.DataError, match=r"of the \d+ images read so far are "
                                                  r"unreadable \(over 10%\): .*00000\.tar.*python data\.py check"):
        for _ in range(20):
            skips(next(it))


def args(ckpt, shards, out, *extra):
    return ["--ckpt", ckpt, "--data", shards, "--out", str(out), "--resolution", "32", "--batch-size", "2",
            "--workers", "2", "--sample-every", "0", "--save-every", "1", "--warmup", "0", "--lr", "1e-3",
            "--ema", "0.9", *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    train.sd.save(train.sd.create(), str(root / "tiny.safetensors"), resolution=32)
    return str(root / "tiny.safetensors"), write_shards(root / "shards", 4, 3, size=(40, 48))


def test_kill_9_and_resume_on_shards_gives_the_same_losses_and_weights(tiny, tmp_path):
    """One DataLoader worker (a forked process, as in real runs; the 2 x 2 split is tested above)."""
    pattern, run = os.path.join(tiny[1], "{00000..00003}.tar"), ("--workers", "1")
    train.main(args(tiny[0], pattern, tmp_path / "ref", "--steps", "5", *run))
    out = tmp_path / "killed"
    n = kill_after_logged(args(tiny[0], pattern, out, "--steps", "1000", *run), out, 2, ENV, ROOT)
    assert 2 <= n < 1000, "the run must have been killed mid-run, after a checkpoint"
    train.main(args(tiny[0], pattern, out, "--steps", "5", "--resume", *run))  # at once: its worker held no lock
    losses = [[json.loads(line)["loss"] for line in open(d / "log.jsonl")] for d in (out, tmp_path / "ref")]
    assert len(losses[0]) == 5 and losses[0] == losses[1], "killed + resumed must repeat the losses exactly"
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (out, tmp_path / "ref"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights must be bit-identical"
    assert all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"])), "EMA too"
    with pytest.raises(SystemExit, match=r"tar shards streamed by 1 process\(es\) x 1 worker\(s\)"):
        train.main(args(tiny[0], pattern, out, "--steps", "6", "--resume", "--workers", "2"))


def test_damaged_shards_in_training_are_warned_and_counted_in_the_log(tiny, tmp_path, capsys):
    folder = str(tmp_path / "s")
    os.makedirs(folder)
    for name in os.listdir(tiny[1]):
        open(os.path.join(folder, name), "wb").write(open(os.path.join(tiny[1], name), "rb").read())
    damage(folder)
    train.main(args(tiny[0], folder, tmp_path / "run", "--steps", "5", "--workers", "0"))  # 10 items: an epoch
    err = capsys.readouterr().err
    assert "warning: " + os.path.join(folder, "00001.tar") + ": 000004.jpg: unreadable" in err, err
    assert "warning: " + os.path.join(folder, "00002.tar") + ": cut short" in err
    last = json.loads(open(tmp_path / "run" / "log.jsonl").read().splitlines()[-1])
    assert (last["skipped"], last["cut_shards"]) == (1, 1), last


@pytest.mark.parametrize("make, message", [
    (lambda d: os.path.join(d, "none-{00000..00003}.tar"), r"the pattern matches no file \(first: .*none-00000\.tar\)"),
    (lambda d: write_shards(os.path.join(d, "nocap"), 1, 2, caption=False),
     r"nocap/00000\.tar: 000000: no \.txt caption; shards need KEY\.jpg\|jpeg\|png\|webp \+ KEY\.txt"),
    (lambda d: open(os.path.join(d, "x.tar"), "wb").write(b"hello" * 300) and os.path.join(d, "x.tar"),
     r"x\.tar: not a tar file \(.*\); --data takes uncompressed tar shards of KEY\.jpg"),
], ids=["no-match", "no-captions", "not-a-tar"])
def test_bad_shards_are_one_line_naming_the_file(tiny, tmp_path, make, message):
    with pytest.raises(SystemExit) as e:
        train.main(args(tiny[0], make(str(tmp_path)), tmp_path / "run", "--steps", "1"))
    msg = str(e.value)
    assert e.value.code == 1 and "\n" not in msg and "Traceback" not in msg and re.search(message, msg), msg
    assert not os.path.exists(tmp_path / "run"), "nothing written"


def test_check_names_every_unusable_item(tmp_path, capsys):
    folder = write_shards(tmp_path / "s", 4, 3)
    damage(folder)
    with pytest.raises(SystemExit, match=r"2 unusable of 10 items"):
        data.main(["check", folder])
    out = capsys.readouterr().out
    assert "00001.tar: 000004.jpg: unreadable" in out and "00002.tar: cut short" in out
    data.main(["check", write_shards(tmp_path / "good", 1, 2)])
    assert "all 2 items usable" in capsys.readouterr().out


def test_cache_shards_are_each_encoded_by_one_process_and_read_back_exactly(tmp_path, monkeypatch):
    """Two processes (rank 0 then rank 1 here; the barrier a no-op): each encodes its share of the 4 shards
    only, and what both read is what encoding every item gives (exactly: the same float32 rows)."""
    shards = data.list_shards(write_shards(tmp_path / "s", 4, 3, size=(40, 48)))
    bundle = random_bundle(0)
    cfg = train.TrainConfig(data=shards[0].replace("00000", "{00000..00003}"), out=str(tmp_path / "out"),
                            resolution=32, batch_size=2, workers=0, ckpt="tiny")
    barriers = []

    def barrier():  # rank 0 stops at its second barrier: rank 1's shards are not there yet (one process here)
        barriers.append(1)
        if len(barriers) == 2:
            raise StopIteration
    monkeypatch.setattr(torch.distributed, "barrier", barrier)
    encoded, real = [], data.encode_cache
    monkeypatch.setattr(data, "encode_cache", lambda cfg, ds, sh, todo, *a: (encoded.append(todo),
                                                                                real(cfg, ds, sh, todo, *a)))
    no_amp = lambda: torch.autocast("cpu", enabled=False)
    with pytest.raises(StopIteration):
        data.disk_cache(cfg, None, shards, bundle, data.Env("cpu", no_amp, 0, 2), data.Skips(cfg.data))
    assert sorted(os.listdir(tmp_path / "out" / "cache")) == ["00000.safetensors", "00002.safetensors", "cache.json"]
    cache = data.disk_cache(cfg, None, shards, bundle, data.Env("cpu", no_amp, 1, 2), data.Skips(cfg.data))
    assert encoded == [[0, 2], [1, 3]], "each shard encoded once, by its process"
    want = []
    for items in ([0, 1], [2], [3, 4], [5], [6, 7], [8], [9, 10], [11]):  # the micro-batches of 2 in each shard
        images = torch.stack([data.load_image(io.BytesIO(jpeg(i, (40, 48))), 32) for i in items])
        want += zip(*data.encode(bundle, images, [f"a picture number {i}" for i in items], no_amp))
    assert len(cache) == 12 and all(torch.equal(cache[i][0], z) and torch.equal(cache[i][1], c)
                                    for i, (z, c) in enumerate(want))
    assert set(load_file(tmp_path / "out" / "cache" / "00003.safetensors")) == {"latents", "context"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_share_the_cache_encoding_and_train(tiny, tmp_path):
    """torchrun-style: 2 processes x 2 workers, --cache on 4 shards: each process encodes 2, both train on all."""
    port = str(free_port())
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args(tiny[0], tiny[1], tmp_path / "ddp", "--steps", "2",
                                                                  "--cache", "--batch-size", "1")]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert "--cache: encoding 2 shard(s)" in logs[0], "rank 0 encodes 2 of the 4 shards (rank 1 the others)"
    assert "12 images (cached)" in logs[0] and len(open(tmp_path / "ddp" / "log.jsonl").readlines()) == 2
    assert sorted(os.listdir(tmp_path / "ddp" / "cache")) == [f"0000{j}.safetensors" for j in range(4)] + ["cache.json"]
