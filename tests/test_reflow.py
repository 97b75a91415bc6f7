"""reflow.py and train.py --task reflow on a tiny random teacher: pairs (exact, resumable, DDP-disjoint), the
straightness measure (analytic), training on the fixed pairs, and the evaluation pipeline on tiny settings."""
import json
import os

import pytest
import torch

import cpu_fast
import data
import diff2flow
import evaluate
import metrics
import reflow
import reflow_eval
import sample
import sd
import train
from helpers import randomize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random Diff2Flow model saved like the demo's (cfg and resolution in its metadata), + a prompt file."""
    root = tmp_path_factory.mktemp("teacher")
    b = sd.create()
    for i, m in enumerate((b.unet, b.vae, b.text_encoder)):
        randomize(m, i).eval()
    b.objective = "diff2flow"
    sd.save(b, str(root / "teacher.safetensors"), resolution=32, cfg=3.0, steps=4)
    (root / "prompts.txt").write_text("a red circle\n\na blue square\na green star\n")
    return str(root / "teacher.safetensors"), str(root / "prompts.txt")


def make(teacher, folder, n, rank=0, world=1, prompts=None, **kw):
    prompts = prompts or os.path.join(os.path.dirname(teacher), "prompts.txt")  # the fixture's
    bundle = sd.load(teacher)
    spec, plist = reflow.pair_spec(bundle, teacher, prompts, kw.pop("steps", 2), kw.pop("cfg", None), 0, 2, 32)
    return reflow.generate_pairs(bundle, str(folder), spec, n, plist, rank, world, progress=False)


def test_pairs_are_the_guided_teachers_ode(teacher, tmp_path):
    path, prompts = teacher
    make(path, tmp_path, 3, prompts=prompts)
    p = reflow.load_pairs(str(tmp_path), 3)
    assert p.noise.shape == p.x1.shape == (3, 4, 8, 8) and len(p) == 3
    assert p.prompts == ["a red circle", "a blue square", "a green star"]  # the file's lines in order
    b = sd.load(path)
    cpu_fast.enable(b.unet)  # as generate_pairs: oneDNN's sums do not depend on the batch size (shards of 2 vs 3)
    model = diff2flow.velocity_model(b.unet, b.alphas_cumprod, b.prediction, b.objective)
    with torch.no_grad():  # cfg: the teacher's metadata (3.0), not the 7.5 fallback
        x1 = diff2flow.sample_euler(model, p.noise, 2, b.encode_prompt(p.prompts), b.encode_prompt([""]), 3.0)
    torch.testing.assert_close(p.x1, x1, rtol=0, atol=1e-6)
    # shard i's noise comes from (seed, i): shard 1 is not shard 0 again
    assert not torch.equal(p.noise[0], p.noise[2])
    assert json.load(open(tmp_path / "pairs.json"))["cfg"] == 3.0


def test_interrupted_generation_continues_to_the_same_pairs(teacher, tmp_path):
    path, _ = teacher
    make(path, tmp_path / "once", 6)
    assert make(path, tmp_path / "killed", 2) == [0]  # stopped after one shard ...
    (tmp_path / "killed" / "00001.safetensors.tmp123").write_bytes(b"half a shard")  # ... while writing the next
    assert make(path, tmp_path / "killed", 6) == [1, 2]  # only the missing shards are made
    assert make(path, tmp_path / "killed", 6) == []
    # DDP: rank r of 2 makes shards r, r + 2, ...; together the same pairs
    assert make(path, tmp_path / "ddp", 6, rank=1, world=2) == [1]
    assert make(path, tmp_path / "ddp", 6, rank=0, world=2) == [0, 2]
    once = reflow.load_pairs(str(tmp_path / "once"), 6)
    for other in ("killed", "ddp"):
        p = reflow.load_pairs(str(tmp_path / other), 6)
        assert torch.equal(p.noise, once.noise) and torch.equal(p.x1, once.x1) and p.prompts == once.prompts


def test_other_settings_in_the_same_folder_are_an_error(teacher, tmp_path):
    path, prompts = teacher
    make(path, tmp_path, 2)
    with pytest.raises(SystemExit, match="cfg 3.0 .now 5.0."):
        make(path, tmp_path, 2, cfg=5.0)
    other = tmp_path / "other.txt"
    other.write_text("a yellow heart\n")
    with pytest.raises(SystemExit, match="prompts 'sha256:[0-9a-f]{16}' .now 'sha256:[0-9a-f]{16}'."):
        make(path, tmp_path, 2, prompts=str(other))
    with pytest.raises(SystemExit, match="00001.safetensors is missing"):
        reflow.load_pairs(str(tmp_path), 5)
    # a folder of an earlier version, whose prompts were drawn at random, is not continued in order
    spec = json.load(open(tmp_path / "pairs.json"))
    del spec["prompt_use"]
    json.dump(spec, open(tmp_path / "pairs.json", "w"))
    with pytest.raises(SystemExit, match="prompt_use None .now 'in order'."):
        make(path, tmp_path, 4)


def test_prompts_are_used_in_order_and_cycle(teacher, tmp_path):
    """Pair j takes line j mod L: each prompt is used as often as any other (here 7 pairs of 3 lines)."""
    path, prompts = teacher
    make(path, tmp_path, 7)
    lines = ["a red circle", "a blue square", "a green star"]
    assert reflow.load_pairs(str(tmp_path), 7).prompts == (lines * 3)[:7]


def test_straightness_of_a_known_path():
    """v(x, t) = a + b t: Euler velocities v_k = a + b t_k, so x_1 - x_0 = a + b mean(t_k) and
    S = |b|^2 var(t_k) / |a + b mean(t_k)|^2; a constant field (b = 0) is straight, S = 0."""
    a, b = torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([0.5, -1.0, 2.0, 0.0])
    def field(x, t, c):
        return (a + b * t.reshape(-1, 1).float()).expand_as(x)
    x0 = torch.zeros(3, 4)
    for steps in (1, 4, 10):
        tk = torch.arange(steps, dtype=torch.float64) / steps
        x1, s = reflow_eval.euler_path(field, x0, steps, None)
        expect = (b.double().pow(2).sum() * tk.var(unbiased=False) / (a.double() + b.double() * tk.mean()).pow(2).sum())
        assert s == pytest.approx(expect.item(), rel=1e-5, abs=1e-7)
        torch.testing.assert_close(x1, diff2flow.sample_euler(field, x0, steps))
    assert reflow_eval.euler_path(lambda x, t, c: a.expand_as(x), x0, 8, None)[1] == pytest.approx(0, abs=1e-12)


def reference_euler_path(model, noise, steps, context, uncond, cfg_scale):
    """euler_path as it was, before sample_euler had a callback: its own copy of sample_euler's loop."""
    x, vs = noise, []
    ts = diff2flow.fm_timesteps(steps)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v = diff2flow.cfg_velocity(model, x, t0, context, uncond, cfg_scale)
        vs.append(v)
        x = x + float(t1 - t0) * v
    d = (x - noise).flatten(1)
    dev = torch.stack([(v.flatten(1) - d).pow(2).sum(1) for v in vs]).mean(0)
    return x, (dev / d.pow(2).sum(1)).mean().item()


def test_euler_path_is_sample_euler_with_cfg(teacher):
    b = sd.load(teacher[0])
    model = diff2flow.velocity_model(b.unet, b.alphas_cumprod, b.prediction, b.objective)
    noise, ctx, unc = torch.randn(2, 4, 8, 8), b.encode_prompt(["a", "b"]), b.encode_prompt([""])
    with torch.no_grad():
        z, s = reflow_eval.euler_path(model, noise, 3, ctx, unc, 2.5)
        assert torch.equal(z, diff2flow.sample_euler(model, noise, 3, ctx, unc, 2.5)) and s > 0
        ref_z, ref_s = reference_euler_path(model, noise, 3, ctx, unc, 2.5)
        assert torch.equal(z, ref_z) and s == ref_s, "the same path and the same straightness number"


def test_psnr():
    a = torch.zeros(2, 3, 4, 4)
    assert reflow_eval.psnr(a, a + 0.2) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item())


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    path, prompts = teacher
    out = tmp_path_factory.mktemp("reflow")
    args = ["--task", "reflow", "--ckpt", path, "--prompts", prompts, "--out", str(out), "--resolution", "32",
            "--n-pairs", "6", "--teacher-steps", "2", "--batch-size", "4", "--steps", "3", "--lora", "4",
            "--sample-every", "0", "--save-every", "0", "--warmup", "0", "--lr", "1e-3"]
    return train.main(args), args, out


def test_train_reflow_writes_a_student_sample_py_runs_in_4_steps(student, tmp_path):
    final, args, out = student
    b = sd.load(final)
    assert (b.meta["steps"], b.meta["cfg"], b.meta["task"], b.objective) == ("4", "1.0", "reflow", "diff2flow")
    assert b.meta["n_pairs"] == "6" and b.meta["lora_config"]  # SD default: LoRA; here rank 4
    assert os.path.exists(os.path.join(out, "pairs", "00000.safetensors"))  # one shard of 64
    paths = sample.main(["--ckpt", final, "--prompt", "a red circle", "--out", str(tmp_path), "--device", "cpu"])
    from PIL import Image
    info = Image.open(paths[0]).text
    assert (info["steps"], info["cfg"]) == ("4", "1.0")


def test_first_loss_is_the_fm_loss_on_the_stored_pairs(student, teacher):
    """Step 1's logged loss = the Diff2Flow loss of the (unchanged: LoRA up = 0) teacher UNet with x_0 = the
    stored noise and x_1 = the stored latent, at train.py's t and data order: the target is latent - noise."""
    final, args, out = student
    cfg = train.parse_args(args)
    train.check_config(cfg)
    pairs = reflow.load_pairs(os.path.join(out, "pairs"), 6)
    b = sd.load(teacher[0])
    idx = torch.tensor(next(data.batch_indices(cfg, 6, 0, 0, 1)))
    _, t, _ = data.draw(cfg, "diff2flow", 0, 4, (4, 8, 8), 1000, "cpu")
    with torch.no_grad():
        loss = diff2flow.diff2flow_loss(b.unet, pairs.x1[idx], b.encode_prompt([pairs.prompts[i] for i in idx]),
                                        b.alphas_cumprod, b.prediction, noise=pairs.noise[idx], t=t)
    logged = json.loads(open(os.path.join(out, "log.jsonl")).readline())["loss"]
    assert logged == pytest.approx(loss.item(), rel=1e-5)


def test_reflow_run_resumes_exactly(student, tmp_path):
    final, args, out = student
    short = [a if a != str(out) else str(tmp_path) for a in args]
    short[short.index("--steps") + 1] = "2"
    train.main(short)
    train.main([*short[:short.index("--steps") + 1], "3", *short[short.index("--steps") + 2:], "--resume"])
    losses = lambda d: [json.loads(line)["loss"] for line in open(os.path.join(d, "log.jsonl"))]
    assert losses(tmp_path) == losses(out)


def test_reflow_errors(teacher, tmp_path):
    with pytest.raises(SystemExit, match="needs --prompts FILE"):
        train.main(["--task", "reflow", "--ckpt", teacher[0], "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--n-pairs and --teacher-steps must be >= 1"):
        train.main(["--task", "reflow", "--ckpt", teacher[0], "--prompts", teacher[1], "--n-pairs", "0",
                    "--out", str(tmp_path)])


def test_evaluate_pipeline_writes_the_results_section(student, teacher, tmp_path):
    final = student[0]
    res = reflow_eval.evaluate_reflow(teacher[0], final, n=8, steps=(1, 2, 4), ref_steps=(25, 40),
                                      results=str(tmp_path / "R.md"), classifier_dir=str(tmp_path), classifier_steps=2)
    rows = {(r["model"], r["steps"]): r for r in res["rows"]}
    assert set(rows) == {("teacher", 1), ("reflow", 1), ("teacher", 2), ("reflow", 2), ("teacher", 4),
                         ("reflow", 4), ("teacher", 25), ("teacher", 40)}
    assert rows["teacher", 40]["mse"] == 0 and rows["teacher", 1]["mse"] > 0
    assert rows["teacher", 4]["calls"] == 8 and rows["reflow", 4]["calls"] == 4  # CFG doubles the teacher's calls
    text = (tmp_path / "R.md").read_text()
    assert "<!-- begin reflow -->" in text and "| reflow | 4 | 4 |" in text and "Straightness" in text
    # each attribute apart, against the real images (the ceiling) and their VAE reconstructions
    real = next(r for r in res["attributes"] if r["model"] == "real images")
    assert all(0 <= rows["reflow", 4][f"acc_{a}"] <= 1 for a in reflow_eval.ATTRS)
    assert rows["reflow", 4]["acc"] == pytest.approx(sum(rows["reflow", 4][f"acc_{a}"] for a in reflow_eval.ATTRS) / 5)
    assert f"| real images | - | {real['acc_shape']:.3f} |" in text and "| VAE reconstructions | - |" in text
    assert "| shape / ceiling |" in text and "prior" not in text


def test_evaluate_reflow_command_writes_the_section_and_the_raw_numbers(student, teacher, tmp_path):
    """toy/evaluate.py reflow (was reflow.py evaluate). The classifier of its default 1500 steps is stood in for by
    a 2-step one under that name: cached_classifier loads what it finds."""
    metrics.save_classifier(metrics.train_classifier(32, 2), tmp_path / "classifier32-1500.safetensors")
    raw, md = tmp_path / "out" / "eval.json", tmp_path / "R.md"
    res = evaluate.main(["reflow", "--teacher", teacher[0], "--student", student[0], "--n", "4", "--seed", "3",
                         "--classifier-dir", str(tmp_path), "--results", str(md), "--raw", str(raw)])
    assert json.loads(raw.read_text()) == json.loads(json.dumps(res)) and res["n"] == 4
    assert {(r["model"], r["steps"]) for r in res["rows"]} == {
        *((m, k) for m in ("teacher", "reflow") for k in (1, 2, 4, 8)), ("teacher", 25), ("teacher", 40)}
    assert "Written by `python toy/evaluate.py reflow`" in md.read_text()
    assert [(r["model"], r["steps"]) for r in res["attributes"][2:]] == [("prior (32 px)", 4), ("prior (32 px)", 25)]
    with pytest.raises(SystemExit, match="--n and --threads must be >= 1") as e:
        evaluate.main(["reflow", "--n", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="no such file") as e:
        evaluate.main(["reflow", "--teacher", teacher[0], "--student", str(tmp_path / "none.safetensors"),
                       "--classifier-dir", str(tmp_path), "--raw", str(raw), "--results", str(md)])
    assert e.value.code == 1


def test_verdicts():
    seeds = {"teacher@25": [dict(fd=10.0, acc=0.80), dict(fd=12.0, acc=0.78), dict(fd=11.0, acc=0.79)],
             "reflow@4": [dict(fd=12.0, acc=0.79), dict(fd=11.0, acc=0.78), dict(fd=12.5, acc=0.78)],
             "reflow@2": [dict(fd=14.0, acc=0.70), dict(fd=15.0, acc=0.72), dict(fd=16.0, acc=0.71)]}
    v = reflow_eval.verdicts({"seeds": seeds})
    ref = v["stats"]["teacher@25"]
    assert (ref["fd"], ref["fd_spread"]) == (11.0, 2.0) and ref["acc_spread"] == pytest.approx(0.02)
    assert v["four"]  # FD 11.83 <= 11 + 2, acc 0.783 >= 0.79 - 0.02
    assert not v["two"] and not v["two_close"]  # acc 0.71 < 0.79 - 3 x 0.02


def test_pairs_cli(teacher, tmp_path):
    path, prompts = teacher
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error: exit status 2
        reflow.main(["pairs", "--ckpt", path, "--out", str(tmp_path)])
    reflow.main(["pairs", "--ckpt", path, "--prompts", prompts, "--out", str(tmp_path), "--n", "3",
                 "--shard-size", "2", "--steps", "1"])
    assert sorted(os.listdir(tmp_path)) == ["00000.safetensors", "00001.safetensors", "pairs.json"]
    assert json.load(open(tmp_path / "pairs.json"))["resolution"] == 32  # from the teacher's metadata
    with pytest.raises(SystemExit, match="--n must be >= 1"):
        reflow.main(["pairs", "--prompts", prompts, "--n", "0"])


def test_ddp_ranks_make_disjoint_shards_and_train_like_one_process(teacher, tmp_path):
    """torchrun-style gloo DDP, 2 CPU processes: rank 0 makes shards 0 and 2, rank 1 shard 1 (of 64 pairs each);
    the pairs equal one process's exactly, and the losses match (1e-5 relative: float summation order)."""
    import socket
    import subprocess
    import sys
    path, prompts = teacher
    common = ["--task", "reflow", "--ckpt", path, "--prompts", prompts, "--resolution", "32", "--n-pairs", "130",
              "--teacher-steps", "1", "--steps", "2", "--lora", "4", "--sample-every", "0", "--save-every", "0"]
    train.main([*common, "--out", str(tmp_path / "one"), "--batch-size", "4"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, os.path.join(reflow.ROOT, "train.py"), *common, "--out", str(tmp_path / "ddp"),
           "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    procs = [subprocess.Popen(cmd, cwd=reflow.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    one, ddp = (reflow.load_pairs(str(tmp_path / d / "pairs"), 130) for d in ("one", "ddp"))
    assert torch.equal(one.noise, ddp.noise) and torch.equal(one.x1, ddp.x1) and one.prompts == ddp.prompts
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")] for d in ("one", "ddp")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_demo_file_chain_lora_on_unet_only_on_full_bundle(student, teacher, tmp_path):
    """make_demo.sh's layout: reflow_tiny (fp16 LoRA) -> d2f_tiny (UNet-only) -> prior_tiny (full), names relative."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    import shutil
    shutil.copy(teacher[0], tmp_path / "prior.safetensors")
    sd.save(sd.load(teacher[0]), str(tmp_path / "d2f.safetensors"), dtype=torch.float16, base="prior.safetensors")
    with safe_open(student[0], "pt") as f:
        meta = {**f.metadata(), "base_model": "d2f.safetensors"}
    save_file({k: v.half() for k, v in load_file(student[0]).items()}, str(tmp_path / "reflow.safetensors"),
              metadata=meta)
    a, b = sd.load(str(tmp_path / "reflow.safetensors")), sd.load(student[0])
    assert (a.meta["steps"], a.meta["cfg"], a.objective) == ("4", "1.0", "diff2flow")
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), b.encode_prompt(["a", "b"])
    with torch.no_grad():  # the same model up to fp16 rounding (measured 2e-3), and the LoRA is in (0.18 away)
        ya, yb, y_teacher = a.unet(x, t, c), b.unet(x, t, c), sd.load(teacher[0]).unet(x, t, c)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0.02)
    assert (ya - y_teacher).abs().max() > 0.05


def test_full_finetune_student_overrides_the_teachers_sampling_defaults(student, tmp_path):
    final, args, out = student
    full = [a if a != str(out) else str(tmp_path) for a in args] + ["--lora", "", "--steps", "1",
                                                                     "--pairs", os.path.join(out, "pairs")]
    b = sd.load(train.main(full))  # a full bundle; the teacher's own metadata says cfg 3.0
    assert (b.meta["cfg"], b.meta["steps"], b.objective, "lora_config" in b.meta) == ("1.0", "4", "diff2flow", False)
    assert not os.path.exists(tmp_path / "pairs")  # --pairs: the existing folder was used


def write_fake_pairs(folder, shards, size=8, dtype=torch.float32):
    """A pairs folder as generate_pairs writes it (pairs.json, NNNNN.safetensors of noise, latent, prompts),
    with random tensors (4, 4, 4): what the reader sees, without a teacher."""
    from safetensors.torch import save_file
    reflow.check_manifest(str(folder), reflow.PairSpec("teacher", "", "sha256:0", shard_size=size, resolution=16))
    for i in range(shards):
        g = torch.Generator().manual_seed(i)
        noise, latent = (torch.randn((size, 4, 4, 4), generator=g).to(dtype) for _ in range(2))
        save_file({"noise": noise, "latent": latent}, reflow.shard_path(str(folder), i),
                  metadata={"prompts": json.dumps([f"prompt {i}.{j}" for j in range(size)])})
    return str(folder)


def test_pairs_stream_shard_by_shard_at_constant_memory(tmp_path):
    """PairShards, what train.py --task reflow reads: over train.py's micro-batches (batch 4) the very pairs of
    load_pairs (everything in RAM), fp32 and fp16 folders alike; it holds one micro-batch at a time whatever n
    (peak_rows = 4 at 40 and at 4000 pairs) and keeps no tensor; 2 DDP ranks read disjoint halves of each
    global batch; a missing or truncated shard is one line naming it."""
    from types import SimpleNamespace
    cfg = SimpleNamespace(seed=0, batch_size=4, grad_accum=1)
    for shards, n, dtype in ((5, 40, torch.float16), (500, 4000, torch.float32)):
        folder = write_fake_pairs(tmp_path / str(n), shards, dtype=dtype)
        stream, everything = reflow.PairShards(folder, n), reflow.load_pairs(folder, n)
        for _, idx in zip(range(25), data.batch_indices(cfg, n, 36, 0, 1)):
            noise, x1, prompts = stream.read(idx)
            assert torch.equal(noise, everything.noise[idx]) and torch.equal(x1, everything.x1[idx])
            assert prompts == [f"prompt {i // 8}.{i % 8}" for i in idx] and noise.dtype == torch.float32
        assert stream.peak_rows == 4 and not any(isinstance(v, torch.Tensor) for v in vars(stream).values())
    ranks = [next(data.batch_indices(cfg, 4000, 80, r, 2)) for r in (0, 1)]
    assert ranks[0] + ranks[1] == next(data.batch_indices(SimpleNamespace(seed=0, batch_size=8, grad_accum=1),
                                                          4000, 80, 0, 1))
    with pytest.raises(SystemExit, match="00005.safetensors is missing"):
        reflow.PairShards(str(tmp_path / "40"), 41)
    path = reflow.shard_path(str(tmp_path / "40"), 2)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit, match=r"00002.safetensors: cannot read this pairs shard .*; delete it") as e:
        reflow.PairShards(str(tmp_path / "40"), 40).read([17])
    assert "\n" not in str(e.value)
