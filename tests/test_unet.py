"""UNet tests. diffusers is a test-only oracle: our LDM-format state dict goes through diffusers' own
LDM->diffusers converter, so key names, shapes and numerics are all checked against it."""
import copy
import io
import json
from dataclasses import asdict, replace

import pytest
import torch

from torch import nn

import cpu_fast
from helpers import randomize
from unet import PRESETS, UNet, UNetConfig

PARITY_ATOL = 1e-4


def diffusers_config(cfg: UNetConfig) -> dict:
    """UNet2DConditionModel kwargs equivalent to an LDM UNet config."""
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2**i in cfg.attention_resolutions for i in range(len(chans))]
    # diffusers' `attention_head_dim` is really the number of heads (a known misnomer)
    heads = cfg.num_heads if cfg.num_head_channels == -1 else [c // cfg.num_head_channels for c in chans]
    return dict(
        sample_size=32, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=chans, layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=heads, use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=cfg.transformer_depth, norm_num_groups=cfg.norm_groups,
        upcast_attention=cfg.upcast_attention)


def ours_on_meta(cfg: UNetConfig) -> UNet:
    with torch.device("meta"):
        return UNet(cfg)


def random_ours(cfg: UNetConfig, seed: int = 0) -> UNet:
    model = ours_on_meta(cfg).to_empty(device="cpu")
    return randomize(model, seed).eval()


def to_diffusers(ours: UNet):
    """Our weights -> LDM checkpoint layout -> diffusers' converter -> strict load (tensors shared)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = diffusers_config(ours.cfg)
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(ldm, config)
    assert len(converted) == len(ldm), "diffusers' converter did not consume every key"
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True, assign=True)
    assert not any(t.is_meta for t in [*ref.parameters(), *ref.buffers()])
    return ref.eval()


def check_parity(cfg: UNetConfig, size: int, atol: float, fast: bool):
    torch.manual_seed(0)
    ours = random_ours(cfg)
    ref = to_diffusers(ours)
    if fast:  # through cpu_fast's oneDNN layers, as sampling on a CPU runs
        cpu_fast.enable(ours)
    x = torch.randn(2, cfg.in_channels, size, size)
    t = torch.tensor([999.0, 412.37])
    ctx = torch.randn(2, 77, cfg.context_dim)
    with torch.no_grad():
        out = ours(x, t, ctx)
        expected = ref(x, t, encoder_hidden_states=ctx).sample
    assert 0.1 < expected.std() < 10, f"random weights give outputs of std {expected.std():.3g}, not O(1)"
    diff = (out - expected).abs().max().item()
    print(f"max abs diff vs diffusers: {diff:.3g} (output std {expected.std():.3g})")
    assert diff <= atol, f"max abs diff {diff:.3g} > atol {atol} vs diffusers"


# ---- full-size SD: keys, shapes, parity -------------------------------------------------------

KNOWN_SHAPES = {  # from the original SD checkpoints (prefix model.diffusion_model. stripped)
    "sd15": {
        "time_embed.0.weight": (1280, 320), "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3), "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280), "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1), "input_blocks.1.1.norm.weight": (320,),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.1.1.transformer_blocks.0.norm3.bias": (320,),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3), "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.transformer_blocks.0.attn1.to_out.0.weight": (1280, 1280),
        "middle_block.2.out_layers.3.bias": (1280,), "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3), "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1), "out.0.weight": (320,), "out.2.weight": (4, 320, 3, 3),
    },
    "sd21": {
        "time_embed.0.weight": (1280, 320), "input_blocks.1.1.proj_in.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "middle_block.1.proj_out.weight": (1280, 1280), "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "out.2.weight": (4, 320, 3, 3),
    },
}
PARAM_COUNTS = {"sd15": 859_520_964, "sd21": 865_910_724}


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_keys_match_ldm_checkpoint(preset):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = ours_on_meta(PRESETS[preset])
    sd = ours.state_dict()
    for key, shape in KNOWN_SHAPES[preset].items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(p.numel() for p in ours.parameters()) == PARAM_COUNTS[preset]
    # diffusers' converter must map every one of our keys onto exactly its model's keys and shapes
    config = diffusers_config(PRESETS[preset])
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in sd.items()}, config)
    with torch.device("meta"):
        ref_sd = UNet2DConditionModel(**config).state_dict()
    assert len(converted) == len(sd)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_parity_full(preset):
    check_parity(PRESETS[preset], size=32, atol=PARITY_ATOL, fast=True)


# ---- tiny config: fast checks of the same code path --------------------------------------------

TINY = PRESETS["tiny"]


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "cpu_fast"])
def test_parity_tiny(fast):
    check_parity(TINY, size=16, atol=PARITY_ATOL, fast=fast)


def test_norm_eps_matches_ldm():
    """On O(1) activations a wrong GroupNorm eps (1e-5 vs 1e-6) moves outputs by only ~4e-6, under
    PARITY_ATOL; on inputs of variance ~1e-6 it is an O(1) change, so blocks are compared there."""
    ours = random_ours(TINY)
    ref = to_diffusers(ours)
    x, ctx, emb = 1e-3 * torch.randn(2, 32, 8, 8), torch.randn(2, 77, 128), torch.randn(2, 128)
    with torch.no_grad():
        res, ref_res = ours.input_blocks[3][0](x, emb), ref.down_blocks[1].resnets[0](x, emb)  # eps 1e-5
        h = 1e-3 * torch.randn_like(res)
        st, ref_st = ours.input_blocks[3][1](h, emb, ctx), ref.down_blocks[1].attentions[0](h, ctx).sample  # 1e-6
    for name, a, b in [("ResBlock", res, ref_res), ("SpatialTransformer", st, ref_st)]:
        diff = (a - b).abs().max().item()
        assert diff <= PARITY_ATOL, f"{name}: max abs diff {diff:.3g} > atol {PARITY_ATOL} vs diffusers"


def test_tiny_shapes_and_sizes():
    model = random_ours(TINY)
    with torch.no_grad():
        for shape in [(2, 4, 16, 16), (1, 4, 8, 24)]:
            assert model(torch.randn(shape), torch.tensor([10.0] * shape[0]), torch.randn(shape[0], 77, 128)).shape == shape


def test_fractional_and_scalar_t():
    model = random_ours(TINY)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 128)
    f = lambda t: model(x, t, ctx)  # noqa: E731
    with torch.no_grad():
        base = f(torch.tensor([412.37, 412.37]))
        near = (f(torch.tensor([412.371, 412.371])) - base).abs().max()
        far = (f(torch.tensor([413.37, 413.37])) - base).abs().max()
        assert 0 < near < far / 100, (near, far)  # fractional t is used, and continuously
        assert torch.equal(f(torch.tensor(412.37)), base)  # 0-d t broadcasts over the batch
        assert torch.equal(f(412.37), base)


def test_in_channels_8():
    model = random_ours(replace(TINY, in_channels=8))
    assert model.input_blocks[0][0].weight.shape == (32, 8, 3, 3)
    with torch.no_grad():
        assert model(torch.randn(2, 8, 16, 16), torch.tensor([1.0, 2.0]), torch.randn(2, 77, 128)).shape == (2, 4, 16, 16)


def test_grad_checkpointing_same_gradients():
    model = random_ours(TINY).train()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 700.5]), torch.randn(2, 77, 128)

    def grads(ckpt: bool):
        model.grad_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        model(x, t, ctx).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_meta_construction_and_config_json():
    model = ours_on_meta(TINY)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    for cfg in PRESETS.values():
        assert UNetConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg


def test_channels_last_and_upcast_match():
    model = random_ours(TINY)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([5.0, 600.0]), torch.randn(2, 77, 128)
    with torch.no_grad():
        base = model(x, t, ctx)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, ctx)
        torch.testing.assert_close(cl, base, rtol=0, atol=1e-5)
        up = UNet(replace(TINY, upcast_attention=True))
        up.load_state_dict(model.state_dict())
        torch.testing.assert_close(up.eval()(x, t, ctx), base, rtol=0, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert up(x, t, ctx).isfinite().all()


# --- the CPU inference fast paths (cpu_fast.enable: packed conv weights, Linears through oneDNN) ---------------

needs_onednn = pytest.mark.skipif(not cpu_fast.available(), reason="this PyTorch build has no oneDNN")


def _fast_and_base(model, *args, monkeypatch):
    """(output with the oneDNN fast paths, output with plain nn.Conv2d / nn.Linear), both under no_grad. The
    plain run switches oneDNN off rather than calling disable, so the fast layers keep their caches."""
    with torch.no_grad():
        fast = model(*args)
        with monkeypatch.context() as m:
            m.setattr(cpu_fast, "_ONEDNN", False)
            base = model(*args)
    return fast, base


def _packed_convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and cpu_fast.is_enabled(m) and m._cache is not None]


def _onednn_calls(model, *args) -> dict:
    """How often one no-grad forward calls oneDNN's packed conv and its linear, by op name."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(*args)
    ops = ("mkldnn::_convolution_pointwise", "mkldnn::_linear_pointwise")
    return {op: sum(e.count for e in prof.key_averages() if e.key == op) for op in ops}


@needs_onednn
def test_enable_switches_every_layer_and_disable_undoes_it():
    """A no-op enable would fail here: every Conv2d/Linear changes class, and the forward calls oneDNN's ops
    once per 3x3 conv and per Linear; the parameters (the very tensors) and state-dict keys stay."""
    model, plain = random_ours(TINY), random_ours(TINY)
    args = torch.randn(1, 4, 16, 16), torch.tensor([300.0]), torch.randn(1, 77, 128)
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert _onednn_calls(model, *args) == dict.fromkeys(["mkldnn::_convolution_pointwise",
                                                         "mkldnn::_linear_pointwise"], 0)
    assert cpu_fast.enable(model) is model
    assert all(cpu_fast.is_enabled(m) and type(m) is not nn.Conv2d and type(m) is not nn.Linear for m in layers)
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in layers)  # still the base classes for isinstance
    assert all(model.get_parameter(n) is p for n, p in params.items()) and list(model.state_dict()) == keys
    convs3 = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in layers)
    linears = sum(isinstance(m, nn.Linear) for m in layers)
    assert _onednn_calls(model, *args) == {"mkldnn::_convolution_pointwise": convs3,
                                           "mkldnn::_linear_pointwise": linears}
    cpu_fast.enable(model)  # idempotent
    assert _onednn_calls(model, *args)["mkldnn::_convolution_pointwise"] == convs3
    assert cpu_fast.disable(model) is model
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in layers) and not _packed_convs(model)
    assert sum(_onednn_calls(model, *args).values()) == 0
    with torch.no_grad():
        assert torch.equal(model(*args), plain(*args))


@needs_onednn
def test_cpu_fast_path_equals_base_layers(monkeypatch):
    model, plain = random_ours(TINY), random_ours(TINY)
    cpu_fast.enable(model)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([5.0, 600.0]), torch.randn(2, 77, 128)
    fast, base = _fast_and_base(model, x, t, ctx, monkeypatch=monkeypatch)
    assert _packed_convs(model), "the fast path was not taken"
    assert fast.is_contiguous()
    with torch.no_grad():
        assert torch.equal(base, plain(x, t, ctx)), "with oneDNN off, the fast layers are exactly the plain ones"
    torch.testing.assert_close(fast, base, rtol=0, atol=1e-5)  # fp32: only the summation order differs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast16, base16 = _fast_and_base(model, x, t, ctx, monkeypatch=monkeypatch)
    assert fast16.dtype == base16.dtype
    err_fast, err_base = ((y.float() - base).abs().max().item() for y in (fast16, base16))
    assert err_fast <= 2 * err_base + 1e-3, f"bf16 fast path error {err_fast:.3g} vs plain bf16 {err_base:.3g}"


@needs_onednn
def test_enable_convs_false_keeps_convs_plain(monkeypatch):
    model = cpu_fast.enable(random_ours(TINY), convs=False)
    args = torch.randn(1, 4, 16, 16), torch.tensor([300.0]), torch.randn(1, 77, 128)
    assert not any(cpu_fast.is_enabled(m) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert all(cpu_fast.is_enabled(m) for m in model.modules() if isinstance(m, nn.Linear))
    fast, base = _fast_and_base(model, *args, monkeypatch=monkeypatch)
    assert not _packed_convs(model)
    torch.testing.assert_close(fast, base, rtol=0, atol=1e-5)


@needs_onednn
def test_cpu_fast_path_follows_weight_changes(monkeypatch):
    """The packed cache must never serve stale weights: in-place edits (an optimizer step, a LoRA merge),
    load_state_dict by copy and by assignment, and dtype round trips all show up in the next output."""
    model, other = cpu_fast.enable(random_ours(TINY, seed=0)), random_ours(TINY, seed=1)
    args = torch.randn(1, 4, 16, 16), torch.tensor([300.0]), torch.randn(1, 77, 128)

    def check():
        fast, base = _fast_and_base(model, *args, monkeypatch=monkeypatch)
        torch.testing.assert_close(fast, base, rtol=0, atol=1e-5)
        return fast

    first = check()
    with torch.no_grad():
        model.input_blocks[1][0].in_layers[2].weight.mul_(1.5)
    assert not torch.allclose(check(), first)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(*args).square().mean().backward()  # with autograd: the plain layers, nothing packed anew
    opt.step()
    model.eval()
    check()
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(check(), _fast_and_base(other, *args, monkeypatch=monkeypatch)[1], rtol=0, atol=1e-5)
    model.load_state_dict({k: v.clone() * 0.5 for k, v in other.state_dict().items()}, assign=True)
    check()
    model.to(torch.bfloat16).to(torch.float32)
    check()


def test_cpu_fast_path_leaves_training_and_copies_alone():
    model = cpu_fast.enable(random_ours(TINY))
    args = torch.randn(1, 4, 16, 16), torch.tensor([300.0]), torch.randn(1, 77, 128)
    model(*args).sum().backward()  # autograd recording: base layers only
    assert not _packed_convs(model)
    with torch.no_grad():
        out = model(*args)
    twin = copy.deepcopy(model)  # opaque oneDNN tensors cannot be copied: the cache is left behind
    assert not _packed_convs(twin)
    buf = io.BytesIO()
    torch.save(model, buf)  # pickling the module goes through the same __getstate__
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert not _packed_convs(loaded)
    for copied in (twin, loaded):  # the copies are fast too (their layers' classes rebuilt by cpu_fast)
        assert all(cpu_fast.is_enabled(m) for m in copied.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        with torch.no_grad():
            torch.testing.assert_close(copied(*args), out, rtol=0, atol=1e-5)
        assert _packed_convs(copied) or not cpu_fast.available()


def test_compiled_graph_uses_plain_layers():
    """Under torch.compile the fast paths step aside (no Python-side cache in the graph): one whole graph,
    same output. aot_eager traces like inductor does without needing a C++ toolchain."""
    model = cpu_fast.enable(random_ours(TINY))
    args = torch.randn(1, 4, 16, 16), torch.tensor([300.0]), torch.randn(1, 77, 128)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(*args)
        assert not _packed_convs(model), "the compiled graph packed weights"
        torch.testing.assert_close(out, model(*args), rtol=0, atol=1e-5)
