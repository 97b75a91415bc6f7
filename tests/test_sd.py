"""sd.py: every source format loads to the same numbers, and every bad input gives a one-line error."""
import ast
import dataclasses
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

import clip_text
import sd
import unet as unet_mod
import vae as vae_mod
from helpers import randomize, random_bundle, write_clip_vocab


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@torch.no_grad()
def outputs(bundle, seed=0):
    """UNet, VAE decode and text encoder outputs on fixed inputs (the three things SD computes)."""
    g = torch.Generator().manual_seed(seed)
    f = bundle.vae.downsample
    x = torch.randn(2, bundle.unet.cfg.in_channels, 16, 16, generator=g)
    ctx = bundle.encode_prompt(["a red circle", "a photo of a cat"])
    z = torch.randn(1, 4, 8, 8, generator=g)
    return bundle.unet(x, torch.tensor([999.0, 412.37]), ctx), bundle.vae.decode(z), ctx, f


# ----------------------------------------------------------------------------- our own files

@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_own_single_file_roundtrip(tmp_path, ext):
    a = random_bundle(seed=1, prediction="v")
    a.objective = "diff2flow"
    path = str(tmp_path / f"model{ext}")
    sd.save(a, path, resolution=32)
    b = sd.load(path)
    assert (b.version, b.prediction, b.objective) == ("sd1", "v", "diff2flow")
    assert b.unet.cfg == a.unet.cfg and b.vae.cfg == a.vae.cfg and b.text_encoder.cfg == a.text_encoder.cfg
    for m, n in [(a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder)]:
        assert same_state(m, n)
    assert torch.equal(a.alphas_cumprod.float(), b.alphas_cumprod.float())
    for x, y in zip(outputs(a)[:3], outputs(b)[:3]):
        assert torch.equal(x, y)
    assert not os.path.exists(path + f".tmp{os.getpid()}")  # atomic write left no temporary behind


def test_files_from_before_double_z_was_retired_load(tmp_path):
    """Our older files store VAEConfig.double_z (always true) in their metadata; they still load."""
    a = random_bundle(seed=2)
    path = str(tmp_path / "old.safetensors")
    sd.save(a, path)
    tensors, meta = sd.read_safetensors(path)
    meta["vae_config"] = json.dumps({**json.loads(meta["vae_config"]), "double_z": True})
    save_file(tensors, path, metadata=meta)
    b = sd.load(path)
    assert b.vae.cfg == a.vae.cfg and same_state(a.vae, b.vae)


DEMO = os.path.join(os.path.dirname(__file__), "..", "assets", "demo")


@pytest.mark.parametrize("name,objective", [("prior_tiny", "diffusion"), ("d2f_tiny", "diff2flow"),
                                            ("depth_tiny", "diff2flow"), ("reflow_tiny", "diff2flow")])
def test_demo_checkpoints_load(name, objective):
    """assets/demo: a full file, UNet-only files and a LoRA file, all built on prior_tiny (whose
    metadata was written while VAEConfig still had double_z)."""
    b = sd.load(os.path.join(DEMO, f"{name}.safetensors"))
    assert (b.name, b.objective) == (f"{name}.safetensors", objective)
    vae = json.loads(sd.safetensors_metadata(os.path.join(DEMO, "prior_tiny.safetensors"))["vae_config"])
    vae.pop("double_z", None)
    assert b.vae.cfg == vae_mod.VAEConfig(**vae)


def test_load_to_bf16_casts_every_float_tensor(tmp_path):
    path = str(tmp_path / "m.safetensors")
    sd.save(random_bundle(), path)
    b = sd.load(path, dtype=torch.bfloat16)
    dtypes = {p.dtype for m in (b.unet, b.vae, b.text_encoder) for p in m.state_dict().values()}
    assert dtypes == {torch.bfloat16}
    assert b.alphas_cumprod.dtype == torch.float64  # the schedule stays exact


def test_prediction_override_and_bad_value(tmp_path):
    path = str(tmp_path / "m.safetensors")
    sd.save(random_bundle(prediction="v"), path)
    assert sd.load(path, prediction="eps").prediction == "eps"
    with pytest.raises(sd.LoadError, match="prediction must be"):
        sd.load(path, prediction="x0")


# ----------------------------------------------------------------------------- original single files

def full_models(version):
    """Full-size SD models with random weights (fp16 to keep the test light)."""
    ucfg = unet_mod.PRESETS["sd15" if version == "sd1" else "sd21"]
    models = []
    for i, (cls, cfg) in enumerate([(unet_mod.UNet, ucfg), (vae_mod.AutoencoderKL, vae_mod.PRESETS["sd"]),
                                    (clip_text.TextEncoder, clip_text.PRESETS[version])]):
        with torch.device("meta"):
            m = cls(cfg)
        models.append(randomize(m.to_empty(device="cpu"), i).half())
    return models


def original_layout(version, models):
    """The state dict as SD's own code writes it, including keys that we intentionally do not use."""
    unet, vae, text = models
    out = {sd.PREFIX["unet"] + k: v for k, v in unet.state_dict().items()}
    out.update({sd.PREFIX["vae"] + k: v for k, v in vae.state_dict().items()})
    out.update({sd.PREFIX[version] + k: v for k, v in text.state_dict().items()})
    if version == "sd1":
        out[sd.PREFIX["sd1"] + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:  # OpenCLIP's last block, projection and logit scale: in the file, unused by SD
        block22 = {k: v for k, v in out.items() if ".resblocks.22." in k}
        out.update({k.replace(".resblocks.22.", ".resblocks.23."): v.clone() for k, v in block22.items()})
        out[sd.PREFIX["sd2"] + "text_projection"] = torch.randn(1024, 1024).half()
        out[sd.PREFIX["sd2"] + "logit_scale"] = torch.tensor(4.6).half()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    out["betas"], out["alphas_cumprod"] = betas, torch.cumprod(1 - betas, 0)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("version,name,prediction", [("sd1", "v1-5-pruned-emaonly.safetensors", "eps"),
                                                     ("sd2", "v2-1_768-ema-pruned.safetensors", "v")])
def test_original_single_file_full_size(tmp_path, version, name, prediction):
    models = full_models(version)
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in original_layout(version, models).items()}, path)
    b = sd.load(path, dtype=torch.float16)
    assert (b.version, b.prediction) == (version, prediction)
    for ours, theirs in zip((b.unet, b.vae, b.text_encoder), models):
        assert same_state(ours, theirs)
    # the same file as a Lightning-style .ckpt ({"state_dict": ...}) loads identically
    ckpt = str(tmp_path / name.replace(".safetensors", ".ckpt"))
    torch.save({"state_dict": original_layout(version, models), "global_step": 470000}, ckpt)
    c = sd.load(ckpt, dtype=torch.float16)
    assert same_state(c.unet, b.unet) and same_state(c.text_encoder, b.text_encoder)


# ----------------------------------------------------------------------------- diffusers folders

def diffusers_folder(root, version):
    """A small SD-shaped diffusers pipeline folder written by diffusers' and transformers' save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    # SD1 says heads (attention_head_dim=2, a diffusers misnomer); SD2 lists heads per level (head width 16)
    heads, linear = (2, False) if version == "sd1" else ([2, 4, 4], True)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=heads, use_linear_projection=linear, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77,
                                        hidden_act="quick_gelu" if version == "sd1" else "gelu"))
    for i, m in enumerate((unet, vae, text)):
        randomize(m, 10 + i).eval()
        m.save_pretrained(root / ["unet", "vae", "text_encoder"][i])
    tok = CLIPTokenizer(vocab=str(write_clip_vocab(root).joinpath("vocab.json")), merges=str(root / "merges.txt"),
                        pad_token="<|endoftext|>" if version == "sd1" else "!")
    tok.save_pretrained(root / "tokenizer")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon" if version == "sd1" else "v_prediction").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return unet, vae, text, tok


@pytest.mark.parametrize("version", ["sd1", "sd2"])
@torch.no_grad()
def test_diffusers_folder_matches_diffusers(tmp_path, version):
    unet, vae, text, tok = diffusers_folder(tmp_path, version)
    b = sd.load(str(tmp_path))
    assert (b.version, b.prediction) == (version, "eps" if version == "sd1" else "v")
    prompts = ["a red circle at the top left", "a photo of a cat, 4k"]
    ids = b.tokenizer(prompts)
    assert torch.equal(ids, tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    ctx = b.text_encoder(ids)
    assert (ctx - text(ids).last_hidden_state).abs().max() <= 1e-5, "text encoder: tolerance 1e-5"
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([999.0, 412.37])
    assert (b.unet(x, t, ctx) - unet(x, t, ctx).sample).abs().max() <= 1e-5, "UNet: tolerance 1e-5"
    z = torch.randn(1, 4, 8, 8)
    want = vae.decode(z / vae.config.scaling_factor).sample
    assert (b.vae.decode(z) - want).abs().max() <= 1e-5, "VAE decode: tolerance 1e-5"
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    want = vae.encode(img).latent_dist.mean * vae.config.scaling_factor
    assert (b.vae.encode(img) - want).abs().max() <= 1e-5, "VAE encode: tolerance 1e-5"
    assert torch.allclose(b.alphas_cumprod, sd.sd_alphas_cumprod())


def test_hf_cache_layout_found_by_repo_id(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--someorg--tiny-sd"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    diffusers_folder(snap, "sd1")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    b = sd.load("someorg/tiny-sd")
    assert b.version == "sd1" and b.name == "0123abcd"
    with pytest.raises(sd.LoadError, match="not in the Hugging Face cache"):
        sd.load("someorg/not-there")


# ----------------------------------------------------------------------------- bad input

def one_line_error(path, match, **kw):
    with pytest.raises(sd.LoadError, match=match) as e:
        sd.load(str(path), **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    sd.save(random_bundle(), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(path, "truncated")


def test_other_architecture_names_the_keys(tmp_path):
    path = tmp_path / "m.safetensors"
    sd.save(random_bundle(), str(path))
    tensors, meta = sd.read_safetensors(str(path))
    tensors["model.diffusion_model.extra_head.weight"] = torch.zeros(3)
    del tensors["model.diffusion_model.out.2.bias"]
    save_file(tensors, str(path), metadata=meta)
    msg = one_line_error(path, "do not fit")
    assert "out.2.bias" in msg and "extra_head.weight" in msg
    # a checkpoint of something else entirely (a classifier, say)
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    one_line_error(tmp_path / "other.safetensors", "no Stable Diffusion UNet")


def test_wrong_shape_is_named(tmp_path):
    path = tmp_path / "m.safetensors"
    sd.save(random_bundle(), str(path))
    tensors, meta = sd.read_safetensors(str(path))
    tensors["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 1, 1)
    save_file(tensors, str(path), metadata=meta)
    one_line_error(path, r"out\.2\.weight has shape")


def test_not_a_checkpoint_and_missing_path(tmp_path):
    (tmp_path / "notes.safetensors").write_text("hello, I am a text file")
    one_line_error(tmp_path / "notes.safetensors", "not a safetensors file")
    (tmp_path / "junk.ckpt").write_bytes(os.urandom(1000))
    one_line_error(tmp_path / "junk.ckpt", "not a PyTorch checkpoint")
    (tmp_path / "model.onnx").write_bytes(b"\0" * 10)
    one_line_error(tmp_path / "model.onnx", "unknown checkpoint type")
    one_line_error(tmp_path / "missing.safetensors", "no such file")


class Evil:
    """Unpickling this would run a shell command that creates a marker file."""
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_ckpt_is_refused_without_running_code(tmp_path):
    Evil.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Evil()}, str(path))
    one_line_error(path, "refusing to load")
    assert not os.path.exists(Evil.marker), "the pickle's code ran"


def test_lightning_bookkeeping_in_ckpt_is_inert(tmp_path):
    """Real SD .ckpt files pickle Lightning callback objects beside the weights; they must not block
    loading, and must not be imported or run."""
    import types
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best = 1.0
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__]
    sys.modules.update({n: mod if n == mod.__name__ else types.ModuleType(n) for n in names})
    try:
        a = random_bundle()
        path = str(tmp_path / "m.ckpt")
        torch.save({"state_dict": sd.state_dict(a), "callbacks": {"cb": ModelCheckpoint()},
                    "d2f_meta": sd.metadata(a)}, path)
    finally:
        for n in names:
            del sys.modules[n]
    b = sd.load(path)
    assert same_state(a.unet, b.unet)


def test_lora_file_loads_its_base(tmp_path):
    import lora
    base = random_bundle()
    sd.save(base, str(tmp_path / "base.safetensors"))
    cfg = dataclasses.replace(lora.PRESETS["small"], rank=4)
    lora.apply_lora(base.unet, cfg)
    with torch.no_grad():
        for n, p in base.unet.named_parameters():
            if "lora_up" in n:
                p.normal_(std=0.05)
    lora.save_lora(base.unet, str(tmp_path / "lora.safetensors"), cfg, base="base.safetensors")
    b = sd.load(str(tmp_path / "lora.safetensors"))
    plain = sd.load(str(tmp_path / "base.safetensors"))
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 128)
    with torch.no_grad():
        want = base.unet(x, t, ctx)
        assert (b.unet(x, t, ctx) - want).abs().max() < 1e-5
        assert (plain.unet(x, t, ctx) - want).abs().max() > 1e-3


def test_unet_only_file_takes_vae_and_text_from_its_base(tmp_path):
    base = random_bundle(seed=3)
    sd.save(base, str(tmp_path / "base.safetensors"))
    tuned = random_bundle(seed=3)
    randomize(tuned.unet, seed=99)
    tuned.objective = "diff2flow"
    sd.save(tuned, str(tmp_path / "unet.safetensors"), base="base.safetensors", resolution=32)
    tensors, meta = sd.read_safetensors(str(tmp_path / "unet.safetensors"))
    assert all(k.startswith(sd.PREFIX["unet"]) for k in tensors)  # only what training changed
    b = sd.load(str(tmp_path / "unet.safetensors"))
    assert same_state(b.unet, tuned.unet) and same_state(b.vae, base.vae) and same_state(b.text_encoder, base.text_encoder)
    assert b.objective == "diff2flow" and b.meta["resolution"] == "32"
    (tmp_path / "base.safetensors").unlink()
    one_line_error(tmp_path / "unet.safetensors", "base.safetensors")


def test_sd2_in_fp16_upcasts_attention(tmp_path):
    """SD2's attention logits overflow fp16 (NaN/black images); loading it in fp16 turns on fp32 attention."""
    for version, dtype, want in [("sd2", torch.float16, True), ("sd2", torch.bfloat16, False), ("sd1", torch.float16, False)]:
        path = str(tmp_path / f"{version}.safetensors")
        sd.save(random_bundle(version=version), path)
        b = sd.load(path, dtype=dtype)
        flags = {m.upcast for m in b.unet.modules() if hasattr(m, "upcast")}
        assert flags == {want} and b.unet.cfg.upcast_attention == want, (version, dtype)


# ----------------------------------------------------------------------------- module layout

ROOT = os.path.join(os.path.dirname(__file__), "..")
LAYERS = ["sd", "diffusers_format", "diff2flow", "vae"]  # the loader's modules and what they build on


def imports(module):
    """(root modules imported at the top of `module`, line numbers of imports anywhere else in it)."""
    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py")).read())
    is_import = lambda n: isinstance(n, (ast.Import, ast.ImportFrom))
    names = {a.name if isinstance(n, ast.Import) else n.module for n in tree.body if is_import(n) for a in n.names}
    hidden = [n.lineno for n in ast.walk(tree) if is_import(n) and n not in tree.body]
    return {m for m in names if os.path.exists(os.path.join(ROOT, f"{m}.py"))}, hidden


def test_loader_imports_one_way():
    """models <- diff2flow <- sd, lora; diffusers_format below sd: no cycles, no imports hidden in functions."""
    graph, todo = {}, list(LAYERS)
    while todo:
        m = todo.pop()
        if m not in graph:
            graph[m], hidden = imports(m)
            assert not hidden or m not in LAYERS, f"{m}.py imports inside functions at lines {hidden}"
            todo += graph[m]
    assert "sd" not in graph["diffusers_format"] | graph["diff2flow"] | graph["lora"]

    def reach(m, seen=()):
        assert m not in seen, f"import cycle {' -> '.join(seen + (m,))}"
        for n in graph[m]:
            reach(n, seen + (m,))
    reach("sd")
