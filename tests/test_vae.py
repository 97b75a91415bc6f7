import dataclasses

import pytest
import torch

from vae import PRESETS, AutoencoderKL, VAEConfig


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fast seeded init that keeps activations O(1); norm affines are randomised too."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.ndim > 1:  # conv weights: fan-in scaling
            p.copy_(r / (p[0].numel() ** 0.5))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * r)
        else:
            p.copy_(0.1 * r)
    return model.eval()


def tiny(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return randomize(AutoencoderKL(PRESETS["tiny"]), seed)


def smooth_images(b: int, h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([torch.sin(3 * xs + c) * torch.cos(2 * ys - c) for c in range(3)])
    return img.expand(b, 3, h, w).clone()


# ---------------------------------------------------------------- fast (tiny config)

def test_config_roundtrip_and_downsample():
    for cfg in PRESETS.values():
        d = dataclasses.asdict(cfg)
        d["ch_mult"] = list(d["ch_mult"])  # what JSON gives back
        assert VAEConfig(**d) == cfg
    assert PRESETS["sd"].downsample == 8 and PRESETS["tiny"].downsample == 4
    assert AutoencoderKL(PRESETS["tiny"]).downsample == 4


@torch.no_grad()
def test_tiny_shapes():
    m = tiny()
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    mean, logvar = m.encode_moments(x)
    assert mean.shape == logvar.shape == (2, 4, 8, 12)
    z = m.encode(x)
    assert z.shape == (2, 4, 8, 12)
    assert m.decode(z).shape == (2, 3, 32, 48)


@torch.no_grad()
def test_sample_deterministic_with_generator_and_differs_from_mean():
    m = tiny()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    a = m.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    b = m.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    c = m.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
    mean = m.encode(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert (a - mean).abs().mean() > 1e-3
    assert torch.equal(mean, m.encode(x))  # sample=False is deterministic


@torch.no_grad()
def test_scale_factor_applied():
    m = tiny()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    mean, _ = m.encode_moments(x)
    z = m.encode(x)
    torch.testing.assert_close(z, mean * 0.18215)
    raw = m.decoder(m.post_quant_conv(mean))  # decoder on the UNscaled mean
    torch.testing.assert_close(m.decode(z), raw, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tiled_decode_blending_is_exact_for_a_local_decoder():
    # With a purely local "decoder" (nearest upsampling) any tiling must reproduce the full result,
    # which checks tile offsets, the ragged last tile and the weight normalisation exactly.
    m = tiny()
    m.decode = lambda t: torch.nn.functional.interpolate(t[:, :3], scale_factor=m.downsample)
    z = torch.randn(2, 4, 37, 29)
    torch.testing.assert_close(m.decode_tiled(z, tile=16, overlap=5), m.decode(z), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_tiled_decode_close_to_untiled():
    # Smooth, stationary latent (period 8 latent px) so every tile sees similar GroupNorm statistics;
    # 48x48 latent -> 2x2 tiles of 32 with overlap 16. Random-weight decoders amplify per-tile norm
    # differences far more than the trained SD VAE does, hence a relative tolerance.
    m = tiny()
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    w = 2 * torch.pi / 8
    z = torch.stack([torch.sin(w * xs + c) * torch.cos(w * ys - c) for c in range(4)])[None] * 0.18215
    full, tiled = m.decode(z), m.decode_tiled(z, tile=32, overlap=16)
    assert tiled.shape == full.shape == (1, 3, 192, 192)
    diff, scale = (tiled - full).abs().mean().item(), full.abs().mean().item()
    assert diff < 0.1 * scale, f"mean |tiled - untiled| {diff:.4f} should be < 10% of mean |out| {scale:.4f}"
    # a latent no larger than one tile goes through decode() unchanged
    torch.testing.assert_close(m.decode_tiled(z[..., :12, :12], tile=16), m.decode(z[..., :12, :12]))


def test_meta_construction_and_key_names():
    with torch.device("meta"):
        m = AutoencoderKL(PRESETS["sd"])
    sd = m.state_dict()
    assert all(v.is_meta for v in sd.values())
    assert len(sd) == 248 and sum(v.numel() for v in sd.values()) == 83_653_863
    assert "decoder.up.3.upsample.conv.weight" in sd
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert "encoder.down.0.downsample.conv.weight" in sd
    assert "encoder.down.3.downsample.conv.weight" not in sd
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    # up[3] is the lowest-resolution level (512 wide); up[0] is the last, 256 -> 128 with a shortcut
    assert sd["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    assert not any(".attn." in k or "temb" in k for k in sd)  # SD's VAE has no per-level attention
    m.to_empty(device="cpu")
    assert m.decoder.conv_out.weight.device.type == "cpu"


# ---------------------------------------------------------------- full SD parity vs diffusers

def diffusers_vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu",
        latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    )


@pytest.mark.slow
@torch.no_grad()
def test_sd_parity_with_diffusers():
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.set_num_threads(2)
    with torch.device("meta"):
        ours = AutoencoderKL(PRESETS["sd"])
    ours = randomize(ours.to_empty(device="cpu"), seed=1)
    config = diffusers_vae_config()
    ldm = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(ldm, config)
    assert len(converted) == len(ldm), "every LDM key must map to exactly one diffusers key"
    theirs = DAutoencoderKL(**config)
    theirs.load_state_dict(converted, strict=True)
    theirs.eval().float()
    sf = config["scaling_factor"]

    x = smooth_images(2, 64, 64) + 0.1 * torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mean, logvar = ours.encode_moments(x)
    dist = theirs.encode(x).latent_dist
    ref_scaled = dist.mean * sf
    assert ref_scaled.abs().mean() > 1e-2, "reference latents are degenerate"
    for name, a, b in [("mean", mean, dist.mean), ("logvar", logvar, dist.logvar),
                       ("encode()", ours.encode(x), ref_scaled)]:
        err = (a - b).abs().max().item()
        assert err <= 1e-4, f"{name}: max abs diff {err:.2e} > 1e-4"

    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * sf
    img, ref = ours.decode(z), theirs.decode(z / sf).sample
    assert img.shape == ref.shape == (1, 3, 128, 128)
    assert ref.abs().mean() > 1e-2 and ref.std() > 1e-2, "reference decode is degenerate"
    err = (img - ref).abs().max().item()
    assert err <= 1e-4, f"decode: max abs diff {err:.2e} > 1e-4"
