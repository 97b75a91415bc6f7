"""train.py on a tiny model (sd.create() presets), 32 px images, a few steps: in process via main(argv),
and as subprocesses for the kill and the two-process (gloo DDP) tests."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import data
import diff2flow
import lora
import sample
import sd
import train
from helpers import kill_after_logged, tiny_training_folder

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses: one thread, as in-process (same float sums)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A fresh tiny SD bundle (v-prediction) saved like any checkpoint, and 6 captioned 40x48 images."""
    return tiny_training_folder(tmp_path_factory.mktemp("tiny"), 6, (40, 48))


def args(tiny, out, *extra):
    ckpt, data = tiny
    return ["--ckpt", ckpt, "--data", data, "--out", str(out), "--resolution", "32", "--batch-size", "2",
            "--workers", "0", "--sample-every", "0", "--save-every", "2", "--warmup", "2", "--lr", "1e-3", *extra]


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def unet_out(unet):
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10.0, 700.0]), c)


def test_lora_run_writes_everything_and_sample_py_loads_it(tiny, tmp_path):
    out = tmp_path / "run"
    final = train.main(args(tiny, out, "--lora", "small", "--steps", "4", "--sample-every", "2"))
    assert sorted(os.listdir(out / "samples")) == ["loss.png"] + [f"step_00000{i}.png" for i in (0, 2, 4)]  # + the curve
    assert Image.open(out / "samples" / "step_000004.png").size == (4 * 32, 32)  # 4 fixed prompts side by side
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and set(log[0]) == {"step", "loss", "lr", "grad_norm", "time"}

    # final.safetensors = base + LoRA with the EMA weights; sd.load follows the base named in its metadata
    loaded = sd.load(final)
    assert (loaded.objective, loaded.prediction) == ("diff2flow", "v")
    ref = sd.load(tiny[0])
    lora.apply_lora(ref.unet, lora.PRESETS["small"])
    ema = torch.load(out / "ckpt.pt", weights_only=True)["ema"]["shadow"]
    with torch.no_grad():
        for p, e in zip([p for p in ref.unet.parameters() if p.requires_grad], ema):
            p.copy_(e)
    ref.unet.eval()
    assert (unet_out(loaded.unet) - unet_out(ref.unet)).abs().max() < 1e-5, "merged LoRA != EMA weights (atol 1e-5)"
    assert (unet_out(loaded.unet) - unet_out(sd.load(tiny[0]).unet)).abs().max() > 1e-4, "training changed nothing"
    paths = sample.main(["--ckpt", final, "--prompt", "a picture", "--steps", "2", "--out", str(tmp_path / "s")])
    assert Image.open(paths[0]).size == (32, 32)  # resolution from the metadata, no flags


@pytest.mark.parametrize("objective", [["diffusion"], ["fm", "--fm-time", "dm_direction"]], ids=["diffusion", "fm_dm"])
def test_full_finetune_records_objective(tiny, tmp_path, objective):
    final = train.main(args(tiny, tmp_path, "--steps", "2", "--ema", "0", "--objective", *objective))
    loaded = sd.load(final)
    assert loaded.objective == ("diffusion" if objective == ["diffusion"] else "fm_dm_direction")
    trained = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(v, trained[k]) for k, v in loaded.unet.state_dict().items()), "final != trained weights"
    model = diff2flow.velocity_model(loaded.unet, loaded.alphas_cumprod, loaded.prediction, loaded.objective)
    assert isinstance(model, diff2flow.NaiveVelocity if objective[0] == "fm" else diff2flow.FlowModel)


def test_lr_schedule_warms_up_then_stays_or_falls_as_a_half_cosine_to_a_tenth():
    lr, warmup, total = 1e-3, 4, 104
    assert [common.lr_at(lr, s, warmup, total) for s in range(4)] == [lr * k / 4 for k in (1, 2, 3, 4)]
    assert all(common.lr_at(lr, s, warmup, total) == lr for s in range(4, total))  # "none": constant after it
    cos = [common.lr_at(lr, s, warmup, total, "cosine") for s in range(total + 1)]
    assert cos[:5] == [lr * k / 4 for k in (1, 2, 3, 4)] + [lr]  # the same warmup, then the peak
    assert cos[54] == pytest.approx(0.55 * lr, rel=1e-12) and cos[total] == pytest.approx(0.1 * lr, rel=1e-12)
    assert all(a > b for a, b in zip(cos[4:], cos[5:]))  # falling at every step after the warmup


def test_cosine_decay_is_what_the_run_logs_and_resume_keeps_it(tiny, tmp_path):
    decay = ("--lr-decay", "cosine", "--warmup", "1", "--lora", "4", "--save-every", "2", "--steps", "5")
    train.main(args(tiny, tmp_path, *decay))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    want = [1e-3] + [1e-3 * (0.55 + 0.45 * math.cos(math.pi * k / 4)) for k in range(4)]  # after a 1-step warmup
    assert [r["lr"] for r in log] == pytest.approx(want, rel=1e-12)
    for name in ("ckpt.pt", "ckpt-000005.pt"):  # back to step 4: the resumed step 5 is the same step
        os.remove(tmp_path / name)
    os.link(tmp_path / "ckpt-000004.pt", tmp_path / "ckpt.pt")
    train.main(args(tiny, tmp_path, *decay, "--resume"))
    again = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [(r["step"], r["lr"], r["loss"]) for r in again] == [(r["step"], r["lr"], r["loss"]) for r in log]
    with pytest.raises(SystemExit, match=r"trained with --lr-decay cosine \(now none\)"):
        train.main([*args(tiny, tmp_path, *decay, "--resume"), "--lr-decay", "none"])


def test_resume_gives_the_same_losses_as_one_run(tiny, tmp_path):
    common = ("--lora", "4", "--save-every", "2")
    train.main(args(tiny, tmp_path / "one", *common, "--steps", "6"))
    train.main(args(tiny, tmp_path / "two", *common, "--steps", "3"))  # stops after step 3 (saved at the end)
    train.main(args(tiny, tmp_path / "two", *common, "--steps", "6", "--resume"))
    assert losses(tmp_path / "two") == losses(tmp_path / "one"), "resumed run must repeat the losses exactly"
    a, b = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "two" / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run must end with the same (EMA) weights exactly"


def test_killed_run_resumes_exactly(tiny, tmp_path):
    train.main(args(tiny, tmp_path / "ref", "--steps", "8"))
    out = tmp_path / "killed"
    n = kill_after_logged(args(tiny, out, "--steps", "1000"), out, 3, ENV, ROOT, timeout=60)
    assert 3 <= n < 1000, "the run must have been killed mid-run, after a checkpoint"
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] >= 2
    train.main(args(tiny, out, "--steps", "8", "--resume"))
    assert losses(out) == losses(tmp_path / "ref"), "killed + resumed must repeat the uninterrupted losses exactly"


def test_same_global_batch_same_losses(tiny, tmp_path):
    """Micro-batches of 1 with 2 accumulation steps see the items, noise and timesteps of one batch of 2."""
    train.main(args(tiny, tmp_path / "b2", "--steps", "3", "--ema", "0"))
    train.main(args(tiny, tmp_path / "acc", "--steps", "3", "--ema", "0", "--batch-size", "1", "--grad-accum", "2"))
    assert rel(losses(tmp_path / "acc"), losses(tmp_path / "b2")) < 1e-5, "accumulation != big batch (rel 1e-5)"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tiny, tmp_path):
    """torchrun-style gloo DDP, 2 CPU processes x 2 micro-steps (no_sync on the first) x batch 1, vs one process
    x batch 4: the same items, noise and timesteps per step; DDP averages the gradients. Tolerances: losses
    1e-5 relative (measured 8e-8: float summation order); final weights 1e-4 absolute (measured 5e-5: Adam's
    m / sqrt(v) amplifies rounding where a gradient is near 0; 3 steps at lr 1e-3 move a weight up to 3e-3)."""
    train.main(args(tiny, tmp_path / "one", "--steps", "3", "--lora", "4", "--batch-size", "4"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           *args(tiny, tmp_path / "ddp", "--steps", "3", "--lora", "4", "--batch-size", "1", "--grad-accum", "2")]
    port = str(free_port())
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    one, ddp = losses(tmp_path / "one"), losses(tmp_path / "ddp")
    assert len(ddp) == 3 and rel(ddp, one) < 1e-5, f"DDP losses {ddp} vs one process {one} (rel 1e-5)"
    a, b = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "ddp" / "final.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4, "final weights differ (atol 1e-4)"


def test_grad_checkpointing_trains_like_without(tiny, tmp_path):
    """--grad-checkpointing recomputes activations: same losses and weights (rel 1e-5 / atol 1e-6: only the
    order of gradient sums may differ). In a subprocess: on CPU it also retunes this process's malloc."""
    train.main(args(tiny, tmp_path / "plain", "--steps", "3"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args(tiny, tmp_path / "ckpt", "--steps", "3",
                                                                  "--grad-checkpointing")]
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert rel(losses(tmp_path / "ckpt"), losses(tmp_path / "plain")) < 1e-5
    a, b = load_file(tmp_path / "plain" / "final.safetensors"), load_file(tmp_path / "ckpt" / "final.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


# A process with glibc's mmap threshold already raised (after freeing a 16 MiB block) allocates 200 x 2 MiB and
# frees every other one; prints the MiB still resident of the 200 freed.
_FREED = """
import sys, torch, train
rss = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
if sys.argv[1] == "1":
    train.return_freed_memory()
big = torch.ones(2**22); del big
ts = [torch.ones(2**19) for _ in range(200)]
full = rss()
del ts[::2]
print(200 - (full - rss()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_return_freed_memory_gives_freed_tensors_back():
    """The root cause of CPU training's peak RSS above its live tensors: glibc keeps freed 1-32 MiB blocks
    resident between live ones; train.return_freed_memory() (used by --grad-checkpointing) gives them back."""
    def resident(flag):
        out = subprocess.run([sys.executable, "-c", _FREED, flag], cwd=ROOT, env=ENV, check=True,
                             capture_output=True, text=True).stdout
        return float(out.split()[-1])
    assert resident("0") > 150, "glibc's default kept the freed memory: the test's premise"
    assert resident("1") < 50, "return_freed_memory must hand freed 2 MiB tensors back to the OS"


def test_cache_trains_like_no_cache(tiny, tmp_path):
    train.main(args(tiny, tmp_path / "plain", "--steps", "3"))
    train.main(args(tiny, tmp_path / "cached", "--steps", "3", "--cache"))
    assert os.path.exists(tmp_path / "cached" / "cache" / "00000.safetensors")  # cache shards on disk
    assert rel(losses(tmp_path / "cached"), losses(tmp_path / "plain")) < 1e-4, "cached latents/text (rel 1e-4)"


def test_nan_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    calls = []

    def poisoned(*a, **kw):  # the real loss, but NaN from the 5th call (step 5) on
        calls.append(1)
        loss = train.diff2flow.diff2flow_loss(*a, **kw)
        return loss * float("nan") if len(calls) >= 5 else loss
    monkeypatch.setitem(train.LOSSES, "diff2flow", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=rf"loss is nan at step 5; .*last good checkpoint: {out / 'ckpt.pt'}$"):
        train.main(args(tiny, out, "--steps", "8"))
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not os.path.exists(out / "final.safetensors")
    monkeypatch.undo()
    train.main(args(tiny, out, "--steps", "6", "--resume"))  # and the run goes on from there
    assert len(losses(out)) == 6


@pytest.mark.parametrize("extra, message", [
    (["--resolution", "4"], "--resolution must be >= 8, got 4"),
    (["--resolution", "36"], "--resolution 36 must be a multiple of 16 for this model (VAE factor 4 x UNet"),
    (["--resolution", "40"], "--resolution 40 must be a multiple of 16 for this model"),
    (["--lora", "huge"], "unknown --lora 'huge': use a preset (base, small, official)"),
    (["--lora", "1.5"], "a rank must be an integer >= 1"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--data", "/nonexistent/folder"], "no such folder"),
    (["--resume"], "--resume: no checkpoint"),
])
def test_clear_errors(tiny, tmp_path, extra, message):
    with pytest.raises(SystemExit) as e:
        train.main(args(tiny, tmp_path, *extra))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(os.path.exists(train.DEMO_PRIOR), reason="the demo prior exists: it is the default --ckpt")
def test_no_ckpt_and_no_demo_prior(tiny, tmp_path):
    with pytest.raises(SystemExit, match="no --ckpt given and the demo prior .*prior_tiny.safetensors is missing"):
        train.main(args(tiny, tmp_path)[2:])


def test_resume_refuses_other_settings_and_fresh_run_refuses_to_overwrite(tiny, tmp_path):
    train.main(args(tiny, tmp_path, "--steps", "1"))
    with pytest.raises(SystemExit, match="ckpt.pt exists: pass --resume"):
        train.main(args(tiny, tmp_path, "--steps", "1"))
    with pytest.raises(SystemExit, match=r"trained with --lr 0.001 \(now 0.01\)"):
        train.main([*args(tiny, tmp_path, "--steps", "2", "--resume"), "--lr", "1e-2"])


def test_batch_layout_splits_the_global_batch():
    """Step s of 2 processes x 2 micro-steps x 2 items = step s of 1 process x 8 items, as [micro][rank][item]."""
    one = data.batch_indices(train.TrainConfig(batch_size=8, seed=1), 5, 3, 0, 1)
    two = [data.batch_indices(train.TrainConfig(batch_size=2, grad_accum=2, seed=1), 5, 3, r, 2) for r in range(2)]
    for _ in range(2):  # steps 3 and 4
        assert next(one) == [i for _ in range(2) for g in two for i in next(g)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_and_resume_continues_exactly(tiny, tmp_path, sig):
    """A cluster's pre-emption (SIGTERM) or Ctrl-C (SIGINT) mid-run: the step in progress ends, ckpt.pt is
    written at that step (no --save-every needed), one line says so, exit status 128 + signal; --resume then
    repeats the uninterrupted run's losses exactly."""
    train.main(args(tiny, tmp_path / "ref", "--steps", "8", "--save-every", "0"))
    out = tmp_path / "stopped"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args(tiny, out, "--steps", "1000", "--save-every", "0")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(losses(out) if os.path.exists(out / "log.jsonl") else []) < 2:
        time.sleep(0.02)
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + sig, err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    last = err.strip().splitlines()[-1]
    assert f"stopped by {sig.name} after step {step}; wrote {out / 'ckpt.pt'}" in last and "Traceback" not in err
    assert 2 <= step < 1000 and len(losses(out)) == step
    train.main(args(tiny, out, "--steps", "8", "--save-every", "0", "--resume"))
    assert losses(out) == losses(tmp_path / "ref")


def test_resolution_is_checked_before_anything_is_written(tiny, tmp_path):
    """A resolution the model cannot take fails with the model's own numbers before --out (or the demo's
    data) is made."""
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        train.main(args(tiny, out, "--resolution", "40"))
    assert e.value.code == 2 and "multiple of 16 for this model (VAE factor 4 x UNet downsampling 4)" in str(e.value)
    assert not out.exists()
    with pytest.raises(SystemExit, match="no such folder"):
        train.main([*args(tiny, out), "--data", str(tmp_path / "missing")])
    assert not out.exists()
    if os.path.exists(train.DEMO_PRIOR):  # the demo preset: its synthetic data would be written first
        with pytest.raises(SystemExit, match="--resolution 40 must be a multiple of 16"):
            train.main(["--task", "t2i", "--resolution", "40", "--out", str(out)])
        assert not out.exists() and not os.path.exists(data.demo("demo:shapes", 40)[0])


def test_help_gives_each_default_once_and_lists_the_presets(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    text = capsys.readouterr().out
    options = text.split("presets (")[0].split("\n  --")[1:]  # one chunk per option
    assert e.value.code == 0 and len(options) == len(train.dataclasses.fields(train.TrainConfig))
    assert "(default: None)" not in text and all(o.count("default") <= 1 for o in options)
    assert any(o.startswith("grad-accum") and "(default: 1)" in o for o in options)
    for name in train.PRESETS:
        assert f"\n  {name} " in text


@pytest.mark.parametrize("argv, preset, lr", [
    (["--data", "D"], "t2i-demo", 2e-4), (["--data", "D", "--lora", "small"], "t2i-demo", 1e-3),
    (["--ckpt", "M", "--data", "D"], "t2i", 1e-5), (["--ckpt", "M", "--data", "D", "--lora", "16"], "t2i", 1e-4),
    (["--task", "reflow", "--ckpt", "M", "--prompts", "P"], "reflow", 1e-4),  # reflow: LoRA small by default
    (["--ckpt", "M", "--data", "D", "--lora", "16", "--lr", "3e-3"], "t2i", 3e-3),
])
def test_preset_learning_rate_follows_lora_and_flags_win(argv, preset, lr):
    cfg = train.parse_args(argv)
    train.check_config(cfg)
    assert (cfg.preset, cfg.lr) == (preset, lr)
