"""The files users bring and take (issue 16): kohya LoRAs out (checked in diffusers' load_lora_weights) and in
(made by diffusers/peft conventions), and the one-line message for each foreign file given as a checkpoint.
Random weights at reduced widths with the real key layout."""
import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import clip_text
import diffusers_format as df
import lora
import sd
import unet as U
from helpers import random_bundle, randomize

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4  # relative max error, ours vs diffusers/peft (fp32; measured ~1e-6)


def small_unet_configs(version):
    """Our UNetConfig and diffusers' UNet2DConditionModel kwargs for SD1's / SD2's layout at width 32."""
    if version == "sd1":
        return (dataclasses.replace(U.PRESETS["sd15"], model_channels=32, num_heads=2, context_dim=32),
                dict(block_out_channels=(32, 64, 128, 128), attention_head_dim=2, cross_attention_dim=32))
    return (dataclasses.replace(U.PRESETS["sd21"], model_channels=32, num_head_channels=16, context_dim=48),
            dict(block_out_channels=(32, 64, 128, 128), attention_head_dim=(2, 4, 8, 8), cross_attention_dim=48,
                 use_linear_projection=True))


def pair(version, seed=0):
    """(our UNet, diffusers' UNet) with the same random weights."""
    from diffusers import UNet2DConditionModel
    ucfg, dcfg = small_unet_configs(version)
    torch.manual_seed(seed)
    ours = randomize(U.UNet(ucfg), seed).eval()
    theirs = UNet2DConditionModel(**dcfg).eval()
    rules = df.unet_key_rules(ucfg)
    theirs.load_state_dict({df.diffusers_unet_key(k, *rules): v for k, v in ours.state_dict().items()}, strict=True)
    return ours, theirs


def inputs(ucfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]),
            torch.randn(2, 7, ucfg.context_dim, generator=g))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def random_lora(model, cfg, seed=2):
    """apply_lora, then random lora_up and per-layer alphas != rank, so the scale alpha / rank matters."""
    lora.apply_lora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALayer):
                m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.3)
                m.alpha.fill_(m.rank * 0.5)


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_diffusers_key_names_invert_ours(version):
    ucfg, dcfg = small_unet_configs(version)
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        keys, theirs = U.UNet(ucfg).state_dict(), UNet2DConditionModel(**dcfg).state_dict()
    rules = df.unet_key_rules(ucfg)
    assert {df.diffusers_unet_key(k, *rules) for k in keys} == set(theirs)
    assert all(df._unet_key(df.diffusers_unet_key(k, *rules), *rules) == k for k in keys)


@pytest.mark.parametrize("version,preset", [("sd1", "small"), ("sd2", "base")])
@torch.no_grad()
def test_kohya_out_loads_exactly_in_diffusers(tmp_path, version, preset):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    ours, theirs = pair(version)
    cfg = dataclasses.replace(lora.PRESETS[preset], train_first_conv=False, train_last_block=False)  # --lora-full none
    random_lora(ours, cfg)
    x, t, c = inputs(ours.cfg)
    want, before = ours(x, t, c), theirs(x, t, c).sample
    path = tmp_path / "k.safetensors"
    save_file(lora.to_kohya(lora.lora_state_dict(ours), ours.cfg), str(path))
    kohya = load_file(str(path))
    assert all(k.startswith("lora_unet_") and not k.endswith(".alpha") for k in kohya)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))[:2]  # raises on any unrenamed key
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, theirs)
    took = sum(n.endswith(".lora_A") for n, _ in theirs.named_modules())
    assert took == sum(isinstance(m, lora.LoRALayer) for m in ours.modules()) == len(kohya) // 2
    got = theirs(x, t, c).sample
    assert rel(got, want) <= TOL and rel(before, want) > 0.1, f"diffusers vs ours: {rel(got, want):.2e} (tol {TOL})"


@torch.no_grad()
def test_kohya_from_peft_merges_as_peft_runs():
    """A kohya file made by diffusers' conventions (peft adapter -> convert_state_dict_to_kohya) -> merge_kohya:
    the output of diffusers' UNet with the peft adapter. Alpha is set to peft's lora_alpha (the converter writes
    alpha = rank whatever lora_alpha was)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict
    ours, theirs = pair("sd1")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "ff.net.2", "time_emb_proj"]
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    x, t, c = inputs(ours.cfg)
    want = theirs(x, t, c).sample
    peft_sd = {"unet." + k: v for k, v in get_peft_model_state_dict(theirs).items()}
    kohya = convert_state_dict_to_kohya(peft_sd)
    kohya = {k: torch.tensor(8.0) if k.endswith(".alpha") else v for k, v in kohya.items()}
    assert lora.merge_kohya(kohya, ours) == len(kohya) // 3 > 100
    assert rel(ours(x, t, c), want) <= TOL


@torch.no_grad()
def test_kohya_te_lora_sd2_fused_qkv_and_ldm_names():
    """lora_te_* in transformers' CLIPTextModel names merges into our OpenCLIP layout (q/k/v rows of in_proj) as
    peft runs it; UNet names in the LDM-path form, a file without alphas and .diff/.diff_b keys merge too."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextConfig, CLIPTextModel
    hf = randomize(CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu")))
    tcfg = dataclasses.replace(clip_text.PRESETS["sd2"], width=32, layers=2, heads=2, output_layer=-1)
    te = clip_text.TextEncoder(tcfg).eval()
    te.load_state_dict(clip_text.from_hf_state_dict(hf.state_dict(), tcfg), strict=True)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets), hf.eval())
    ids = torch.randint(0, 49408, (2, 77))
    kohya = convert_state_dict_to_kohya({"text_encoder." + k: v for k, v in get_peft_model_state_dict(hf).items()})
    assert all(k.startswith("lora_te1_") for k in kohya)  # diffusers' converter's name for an SD1/SD2 encoder
    ours, _ = pair("sd1")
    d = torch.randn(ours.out[2].weight.shape) * 0.1
    kohya.update({"lora_unet_out_2.diff": d, "lora_unet_out_2.diff_b": torch.ones(4),
                  "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.randn(2, 32, 1, 1),
                  "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.randn(32, 2, 1, 1)})
    w_out, b_out, w_proj = (t.clone() for t in (ours.out[2].weight, ours.out[2].bias,
                                                ours.input_blocks[1][1].proj_in.weight))
    lora.merge_kohya(kohya, ours, te)
    assert rel(te(ids), hf(ids).last_hidden_state) <= TOL
    assert torch.allclose(ours.out[2].weight, w_out + d) and torch.allclose(ours.out[2].bias, b_out + 1)
    up, down = kohya["lora_unet_input_blocks_1_1_proj_in.lora_up.weight"], kohya[
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight"]
    delta = (up.flatten(1) @ down.flatten(1))[..., None, None]  # a 1x1 conv's LoRA (SD1's proj_in)
    assert torch.allclose(ours.input_blocks[1][1].proj_in.weight, w_proj + delta)


@pytest.mark.parametrize("leaf,kind", [("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr"), ("oft_blocks", "OFT"),
                                       ("dora_scale", "DoRA"), ("lora_mid.weight", "Tucker")])
def test_lycoris_kinds_are_named(tmp_path, leaf, kind):
    b = random_bundle()
    path = tmp_path / "x.safetensors"
    save_file({f"lora_unet_conv_in.{leaf}": torch.zeros(2, 2), "lora_unet_conv_in.alpha": torch.tensor(1.0)}, str(path))
    with pytest.raises(sd.LoadError, match=kind) as e:
        sd.apply_lora(b, str(path))
    assert "\n" not in str(e.value)


def test_export_cli_diff_keys_and_reimport(tmp_path, capsys):
    """train.py's final LoRA (first conv + out block trained fully) -> lora.py export -> merged back into the base
    by merge_kohya: the same UNet output as our LoRA merged; the depth LoRA's widened conv is refused."""
    b = random_bundle()
    sd.save(b, str(tmp_path / "base.safetensors"))
    lcfg = lora.config_from_args("4", "first,last", "t2i")
    random_lora(b.unet, lcfg)
    with torch.no_grad():
        b.unet.out[2].bias += 0.5
        b.unet.input_blocks[0][0].weight.mul_(1.1)
    note = lora.save_final(b.unet, str(tmp_path / "final.safetensors"), lcfg, base="base.safetensors")
    assert "wrote" in note and ".diff" in note and "diffusers" in note
    kohya = load_file(str(tmp_path / "final_kohya.safetensors"))
    assert {"lora_unet_conv_in.diff", "lora_unet_conv_in.diff_b", "lora_unet_conv_out.diff",
            "lora_unet_out_0.diff"} <= set(kohya)  # the GroupNorm by its LDM name: A1111 maps no conv_norm_out
    lora.main(["export", str(tmp_path / "final.safetensors"), str(tmp_path / "pure.safetensors"), "--drop-diff"])
    assert not any(".diff" in k for k in load_file(str(tmp_path / "pure.safetensors")))
    with pytest.raises(SystemExit, match="exists"):
        lora.main(["export", str(tmp_path / "final.safetensors"), str(tmp_path / "pure.safetensors")])
    x, t, c = inputs(b.unet.cfg)
    with torch.no_grad():
        want = b.unet(x, t, c)
        base = sd.load(str(tmp_path / "base.safetensors"), lora_file=str(tmp_path / "final_kohya.safetensors"))
        assert rel(base.unet(x, t, c), want) <= TOL
    wide = random_bundle()
    wide.unet.input_blocks[0][0] = torch.nn.Conv2d(8, wide.unet.input_blocks[0][0].out_channels, 3, padding=1)
    lora.apply_lora(wide.unet, lcfg)
    (tmp_path / "depth").mkdir()
    note = lora.save_final(wide.unet, str(tmp_path / "depth" / "final.safetensors"), lcfg, base="../base.safetensors")
    assert note.startswith("no final_kohya.safetensors") and "widened" in note, note
    with pytest.raises(SystemExit, match="--lora-full must include 'first'"):
        lora.config_from_args("small", "none", "depth")


# ----------------------------------------------------------------------------- foreign files, each named

def load_error(path, match):
    with pytest.raises(sd.LoadError, match=match) as e:
        sd.load(str(path))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_foreign_files_are_named(tmp_path):
    b = random_bundle()
    save_file(b.vae.state_dict(), str(tmp_path / "vae.safetensors"))
    load_error(tmp_path / "vae.safetensors", "a VAE alone .*pass a full SD 1.x/2.x checkpoint")
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3)}, str(tmp_path / "style.safetensors"))
    load_error(tmp_path / "style.safetensors", "a kohya/A1111 LoRA, not a model; pass the base .* --lora")
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(1, 4)}, str(tmp_path / "peft.safetensors"))
    load_error(tmp_path / "peft.safetensors", "a diffusers/peft LoRA")
    rules = df.unet_key_rules(b.unet.cfg)
    diffusers_unet = {df.diffusers_unet_key(k, *rules): v for k, v in b.unet.state_dict().items()}
    save_file(diffusers_unet, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    load_error(tmp_path / "diffusion_pytorch_model.safetensors", "diffusers-format UNet alone .*pass the diffusers folder")
    save_file({**diffusers_unet, "add_embedding.linear_1.weight": torch.zeros(1)}, str(tmp_path / "xl.safetensors"))
    load_error(tmp_path / "xl.safetensors", "SDXL is not supported")
    for name, config in (("unet", {"_class_name": "UNet2DConditionModel"}),
                         ("xl", {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time",
                                 "cross_attention_dim": 2048})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        save_file(diffusers_unet, str(tmp_path / name / "diffusion_pytorch_model.fp16.safetensors"))
    load_error(tmp_path / "unet", "a diffusers UNet2DConditionModel folder alone; pass the diffusers pipeline folder")
    load_error(tmp_path / "xl", "an SDXL UNet; SDXL is not supported")


def test_depth2img_keys_are_named(tmp_path):
    b = random_bundle(unet=dataclasses.replace(U.PRESETS["tiny"], in_channels=5))  # latent + depth, as depth2img
    extra = {"depth_model.scratch.output_conv.0.weight": torch.zeros(2, 2), "depth_model.pretrained.x": torch.zeros(2)}
    save_file({**sd.state_dict(b), **extra}, str(tmp_path / "depth.safetensors"), metadata=sd.metadata(b))
    with pytest.warns(UserWarning, match=r"depth2img checkpoint: its 2 depth_model\.\* keys .* not loaded; its UNet takes 5"):
        sd.load(str(tmp_path / "depth.safetensors"))


@torch.no_grad()
def test_fp16_variant_folder_loads_and_unet_file_finds_its_folder(tmp_path):
    from test_sd import diffusers_folder
    unet, _, _, _ = diffusers_folder(tmp_path, "sd1")
    for comp, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):  # what variant="fp16" downloads: only *.fp16.safetensors
        plain = tmp_path / comp / f"{name}.safetensors"
        save_file({k: v.half() for k, v in load_file(str(plain)).items()}, str(plain.with_suffix(".fp16.safetensors")))
        plain.unlink()
    b = sd.load(str(tmp_path))
    w = unet.conv_in.weight.half().float()
    assert torch.equal(b.unet.input_blocks[0][0].weight, w)
    with pytest.warns(UserWarning, match="loading the pipeline folder around it"):
        b2 = sd.load(str(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    assert torch.equal(b2.unet.input_blocks[0][0].weight, w)
