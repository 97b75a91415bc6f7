import copy
import io
import json
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cpu_fast
import lora
from lora import (GROUPS, PRESETS, LoRAConfig, LoRALayer, apply_lora, load_exact, load_lora, lora_rank,
                  lora_state_dict, merge_lora, save_lora, to_kohya)
from unet import PRESETS as UNET_PRESETS
from unet import UNet

ALL = LoRAConfig(rank=4, targets=GROUPS)  # every group, so every wrapper type and pattern is exercised


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed=0) -> UNet:
    """Tiny UNet with every parameter random (norms too), so zero-init layers can't hide mistakes."""
    torch.manual_seed(seed)
    m = UNet(UNET_PRESETS["tiny"])
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m.eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ctx_dim = UNET_PRESETS["tiny"].context_dim
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 5, ctx_dim, generator=g)


def train_a_bit(model, steps=3):
    """A few optimizer steps on a random target, so lora_up != 0 and the fully trained layers move."""
    x, t, c = inputs(2)
    target = torch.randn(2, 4, 16, 16)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x, t, c), target).backward()
        opt.step()
    model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "cpu_fast"])
@pytest.mark.parametrize("cfg", [ALL, PRESETS["base"], PRESETS["small"]], ids=["all", "base", "small"])
def test_fresh_lora_is_identity(cfg, fast):
    """Exact, unmerged and merged, also with cpu_fast enabled on both models (the LoRA layers' base computation
    then runs the same oneDNN kernels as the base model's layers) and under bf16 autocast."""
    base, wrapped = tiny_unet(), tiny_unet()
    names = apply_lora(wrapped, cfg)
    assert names and all(isinstance(wrapped.get_submodule(n), LoRALayer) for n in names)
    if fast:
        for m in (base, wrapped):
            cpu_fast.enable(m)
        assert all(cpu_fast.is_enabled(wrapped.get_submodule(n)) for n in names)
    with torch.no_grad():
        assert torch.equal(wrapped(*inputs()), base(*inputs())), "zero-init lora_up must change nothing (exact)"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(wrapped(*inputs()), base(*inputs())), "bf16: zero-init lora_up changes nothing"
        merge_lora(wrapped)  # W += 0
        assert torch.equal(wrapped(*inputs()), base(*inputs())), "a merged fresh LoRA changes nothing (exact)"


def test_every_group_hits_the_tiny_unet():
    model = tiny_unet()
    names = apply_lora(model, ALL)
    groups = {lora.target_group(n, model.get_submodule(n)) for n in names}
    assert groups == set(GROUPS), f"groups never matched: {set(GROUPS) - groups}"
    assert "input_blocks.0.0" not in names and "out.2" not in names  # trained fully, never LoRA


def test_base_keys_unchanged_and_load_exact():
    base = tiny_unet()
    base_sd = base.state_dict()
    wrapped = tiny_unet(seed=5)
    apply_lora(wrapped, ALL)
    wsd = wrapped.state_dict()
    assert set(base_sd) <= set(wsd), "every base key must survive wrapping unchanged"
    assert all(lora.is_lora_key(k) for k in set(wsd) - set(base_sd)), "only LoRA keys may be added"
    assert any(k.endswith("attn1.to_q.lora_down.weight") for k in wsd)
    with pytest.raises(RuntimeError, match="Missing key"):  # plain strict=True fails on exactly the LoRA keys
        wrapped.load_state_dict(base_sd, strict=True)
    base_keys = [k for k in wsd if not lora.is_lora_key(k)]  # a base checkpoint into a LoRA-wrapped model
    load_exact(wrapped, base_sd, base_keys, "base checkpoint")
    assert all(torch.equal(wrapped.state_dict()[k], v) for k, v in base_sd.items())
    with torch.no_grad():
        assert torch.equal(wrapped(*inputs()), base(*inputs()))
    partial = {k: v for k, v in base_sd.items() if k != "out.2.bias"}
    with pytest.raises(KeyError, match=r"missing keys \['out.2.bias'\]"):
        load_exact(wrapped, partial, base_keys, "base checkpoint")
    with pytest.raises(KeyError, match="unexpected.*bogus"):
        load_exact(wrapped, {**base_sd, "bogus.weight": torch.zeros(1)}, base_keys, "base checkpoint")


def test_gradients_only_on_lora_and_fully_trained():
    model = tiny_unet()
    apply_lora(model, PRESETS["small"])
    model.train()
    model(*inputs()).square().mean().backward()
    for name, p in model.named_parameters():
        trainable = ".lora_" in name or name.startswith(("input_blocks.0.0.", "out."))
        assert p.requires_grad == trainable, name
        assert (p.grad is not None) == trainable, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_up.weight"))


def test_merge_exact():
    model = tiny_unet()
    apply_lora(model, ALL)
    train_a_bit(model)
    assert all(m.lora_up.weight.abs().max() > 0 for m in model.modules() if isinstance(m, LoRALayer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y = model(*inputs())
        merge_lora(model)
        y_merged = model(*inputs())
        assert rel_err(y_merged, y) < 1e-5, f"merged vs LoRA output rel err {rel_err(y_merged, y):.2e} (tol 1e-5)"
        conv = model.get_submodule("input_blocks.1.0.in_layers.2")  # a 3x3 conv LoRA: 1x1 up x 3x3 down
        assert not torch.allclose(conv.weight, before["input_blocks.1.0.in_layers.2.weight"])
    with pytest.raises(AssertionError, match="already merged"):
        merge_lora(model)


@pytest.mark.skipif(not cpu_fast.available(), reason="this PyTorch build has no oneDNN")
def test_lora_layers_take_the_fast_path():
    """A trained LoRA, unmerged and merged (enable before or after the merge, as sampling does), runs its base
    computation through cpu_fast and stays within 1e-5 (relative) of the plain model; copies stay fast."""
    model = tiny_unet()
    apply_lora(model, ALL)
    train_a_bit(model)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        want = plain(*inputs())
        fast = cpu_fast.enable(model)(*inputs())
        assert rel_err(fast, want) < 1e-5, f"fast vs plain LoRA rel err {rel_err(fast, want):.2e} (tol 1e-5)"
        wrapped = [m for m in model.modules() if isinstance(m, LoRALayer)]
        assert all(cpu_fast.is_enabled(m) for m in wrapped)
        assert any(m._cache is not None for m in wrapped if isinstance(m, torch.nn.Conv2d)), "no packed LoRA conv"
        merge_lora(model)  # in place: the packed weights must follow
        merge_lora(plain)
        want = plain(*inputs())
        assert rel_err(model(*inputs()), want) < 1e-5
        assert rel_err(cpu_fast.enable(plain)(*inputs()), want) < 1e-5  # merged first, then enabled
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
            assert all(cpu_fast.is_enabled(m) for m in twin.modules() if isinstance(m, LoRALayer))
            assert torch.equal(twin(*inputs()), model(*inputs()))


def test_save_load_roundtrip(tmp_path):
    model = tiny_unet()
    cfg = PRESETS["small"]
    apply_lora(model, cfg)
    train_a_bit(model)
    path = str(tmp_path / "lora.safetensors")
    save_lora(model, path, cfg, base="tiny-unet sha256:1234")
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["base_model"] == "tiny-unet sha256:1234"
    assert LoRAConfig(**json.loads(meta["lora_config"])) == cfg
    assert keys == set(lora_state_dict(model)) and not any(".to_q.weight" in k for k in keys)

    fresh = tiny_unet()  # same base weights, no LoRA yet
    assert load_lora(fresh, path) == cfg
    with torch.no_grad():
        assert torch.equal(fresh(*inputs()), model(*inputs()))

    sd = lora_state_dict(model)
    bad = {k: v.contiguous() for k, v in sd.items() if not k.endswith("attn2.to_k.lora_up.weight")}
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata={"lora_config": json.dumps(asdict(cfg))})
    with pytest.raises(KeyError, match=r"missing keys \[.*attn2\.to_k\.lora_up\.weight"):
        load_lora(tiny_unet(), str(tmp_path / "bad.safetensors"))


def test_kohya_roundtrip():
    """to_kohya (scale folded into lora_up, fully trained layers as .diff/.diff_b) -> merge_kohya into the base: the
    same UNet output as our LoRA merged."""
    model = tiny_unet()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, PRESETS["small"])
    train_a_bit(model)
    kohya = to_kohya(lora_state_dict(model), model.cfg, base_sd)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # tiny: attention from ds=2
    assert lora.kohya_unet_name("input_blocks.3.1.transformer_blocks.0.attn1.to_q", model.cfg) == name
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight"} <= set(kohya) and not any("alpha" in k for k in kohya)
    assert kohya["lora_unet_conv_out.diff"].shape == (4, 32, 3, 3) and "lora_unet_out_0.diff_b" in kohya
    x, t, c = inputs()
    with torch.no_grad():
        want = model(x, t, c)
        back = tiny_unet()
        assert lora.merge_kohya(kohya, back) == len({k.partition(".")[0] for k in kohya})
        assert rel_err(back(x, t, c), want) <= 1e-5, "kohya round trip (tol 1e-5 relative)"
    with pytest.raises(AssertionError, match="needs base_sd"):
        to_kohya(lora_state_dict(model), model.cfg)


def full_sd21(cfg=None):
    with torch.device("meta"):  # shapes only: no memory, no heavy lock
        m = UNet(UNET_PRESETS["sd21"])
    names = apply_lora(m, cfg) if cfg else []
    return m, names


def test_kohya_names_are_diffusers_module_paths():
    """kohya's SD1/SD2 trainer's names (diffusers module paths, '.' -> '_'), one per wrapped layer, each resolved
    back to that layer by kohya_targets; the LDM-path form resolves to the same layer."""
    model, names = full_sd21(PRESETS["base"])
    meta_sd = {k: torch.empty(0) for k in model.state_dict() if lora.is_lora_key(k)}  # names only
    kohya_names = {k.partition(".")[0] for k in to_kohya(meta_sd, model.cfg)}
    assert len(kohya_names) == len(names) == 192
    targets, modules = lora.kohya_targets(model), dict(model.named_modules())
    for n in names:
        ours = targets["lora_unet_" + n.replace(".", "_")]
        assert targets[lora.kohya_unet_name(n, model.cfg)][0] is ours[0] is modules[n].weight, n
    kn = {k.removeprefix("lora_unet_") for k in kohya_names}
    assert "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in kn
    assert "up_blocks_0_upsamplers_0_conv" in kn  # output_blocks.2.1.conv
    assert "down_blocks_0_resnets_0_conv_shortcut" not in kn  # 320 -> 320: Identity, no conv there
    assert "down_blocks_1_resnets_0_conv_shortcut" in kn  # 320 -> 640: 1x1 conv


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("preset,paper,exact", [("base", 222e6, 217_371_972), ("small", 62e6, 61_513_156)])
def test_preset_param_counts_match_paper(preset, paper, exact):
    """Paper (SD2.1, 866M UNet params): 'base' 20% rank -> 222M trainable, 'small' rank 64 -> 62M."""
    base, _ = full_sd21()
    assert abs(sum(p.numel() for p in base.parameters()) - 866e6) / 866e6 < 1e-3
    model, _ = full_sd21(PRESETS[preset])
    n = trainable(model)
    assert abs(n - paper) / paper < 0.03, f"{preset}: {n / 1e6:.2f}M trainable vs paper {paper / 1e6:.0f}M (tol 3%)"
    assert n == exact


def test_official_rule_counts():
    """The official code's exact rule (all Conv2d + attn1/attn2 q/k/v at 20%, first conv and out block fully
    trained) on SD2.1, where proj_in/out are Linear, gives 207.5M -- 6.6% under the paper's 222M."""
    model, _ = full_sd21(LoRAConfig(rank=0.2, targets=("conv", "attn1", "attn2")))
    assert trainable(model) == 207_459_652


def test_rank_fraction():
    assert lora_rank(0.2, 320, 1280) == 256 and lora_rank(0.2, 320, 320) == 64  # ceil(0.2 * max(in, out))
    assert lora_rank(0.2, 1024, 320) == 205 and lora_rank(64, 4, 320) == 64
    model, _ = full_sd21(PRESETS["base"])
    conv = model.get_submodule("input_blocks.4.0.in_layers.2")  # 320 -> 640, 3x3
    assert conv.lora_down.weight.shape == (128, 320, 3, 3) and conv.lora_up.weight.shape == (640, 128, 1, 1)
    k = model.get_submodule("input_blocks.1.1.transformer_blocks.0.attn2.to_k")  # 1024 -> 320
    assert k.lora_down.weight.shape == (205, 1024) and k.lora_up.weight.shape == (320, 205)


def test_config_json_roundtrip():
    for cfg in PRESETS.values():
        assert LoRAConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg
    with pytest.raises(AssertionError, match="unknown LoRA targets"):
        LoRAConfig(targets=("attn3",))
    with pytest.raises(AssertionError, match="rank"):
        LoRAConfig(rank=1.5)
