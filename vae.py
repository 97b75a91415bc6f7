"""Stable Diffusion KL autoencoder ("first_stage_model"), compact plain PyTorch.

Mirrors LDM's ldm/models/autoencoder.py AutoencoderKL and the Encoder/Decoder of
ldm/modules/diffusionmodules/model.py: the module tree reproduces the original checkpoint, so
`AutoencoderKL(cfg).load_state_dict(sd)` works (strict) once the `first_stage_model.` prefix is
stripped. No rename table.

Latent conventions (what the rest of the repo relies on):
  * `encode(x)` takes images in [-1, 1], (B, 3, H, W), and returns latents (B, 4, H/8, W/8) ALREADY
    MULTIPLIED by `scale_factor` (0.18215 for SD 1.x/2.x), i.e. what the diffusion UNet sees. This
    scaling gives the latents roughly unit variance.
  * `encode` returns the posterior MEAN unless `sample=True` (then mean + std * noise drawn with
    `generator`). The mean is deterministic, which is what you want for latent caches / fine-tuning.
  * `decode(z)` takes SCALED latents (divides by `scale_factor` itself) and returns images in roughly
    [-1, 1]. It does NOT clamp; clamp yourself before converting to uint8.
  * `encode_moments(x)` returns the unscaled (mean, logvar), for training the VAE itself.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)  # latent downsampling factor is 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.18215
    norm_groups: int = 32

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)  # JSON round-trip turns tuples into lists

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


PRESETS: dict[str, VAEConfig] = {
    "sd": VAEConfig(),  # SD 1.x and SD 2.x use the same VAE architecture
    # 3 levels -> downsample factor 4; trains in seconds on CPU, same code path as "sd".
    "tiny": VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
}


def norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6)  # LDM uses eps 1e-6, not the PyTorch default 1e-5


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:  # 1x1 projection on the skip path only when widths change
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; q/k/v/proj_out are 1x1 convs as in the checkpoint."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head over all HW tokens; SDPA keeps 4096 tokens cheap
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(2, 3) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        # LDM pads right/bottom only, then a stride-2 unpadded conv; symmetric padding would shift
        # the output by half a pixel and break parity with the trained weights.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def level(blocks: list, name: str | None = None, sample: nn.Module | None = None) -> nn.Module:
    """One resolution level: `.block` list plus an optional `.downsample`/`.upsample` (LDM layout)."""
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    if sample is not None:
        setattr(m, name, sample)
    return m


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down, c = nn.ModuleList(), cfg.ch
        for i, w in enumerate(widths):
            blocks = [ResnetBlock(c if j == 0 else w, w, g) for j in range(cfg.num_res_blocks)]
            c = w
            last = i == len(widths) - 1  # no downsample after the lowest resolution
            self.down.append(level(blocks, "downsample", None if last else Downsample(w)))
        self.mid = Mid(c, g)
        self.norm_out = norm(c, g)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)  # mean and logvar (LDM: double_z=True)

    def forward(self, x):
        h = self.conv_in(x)
        for lv in self.down:
            for blk in lv.block:
                h = blk(h)
            if hasattr(lv, "downsample"):
                h = lv.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Mid(c, g)
        # Built lowest resolution first, but stored so that up[i] is the level with width
        # widths[i]: up[-1] runs first, up[0] last (LDM's `self.up.insert(0, ...)`).
        ups = []
        for i in reversed(range(len(widths))):
            w = widths[i]
            blocks = [ResnetBlock(c if j == 0 else w, w, g) for j in range(cfg.num_res_blocks + 1)]
            c = w
            ups.insert(0, level(blocks, "upsample", Upsample(w) if i != 0 else None))
        self.up = nn.ModuleList(ups)
        self.norm_out = norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for lv in reversed(self.up):
            for blk in lv.block:
                h = blk(h)
            if hasattr(lv, "upsample"):
                h = lv.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg, self.downsample, self.scale_factor = cfg, cfg.downsample, cfg.scale_factor
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_moments(self, x):
        """(B, 3, H, W) in [-1, 1] -> unscaled (mean, logvar), each (B, embed_dim, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # same clamp as LDM DiagonalGaussianDistribution

    def encode(self, x, sample: bool = False, generator: torch.Generator | None = None):
        """Images -> latents scaled by scale_factor (posterior mean unless sample=True).

        `generator` must live on the same device as `x`.
        """
        mean, logvar = self.encode_moments(x)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return z * self.scale_factor

    def decode(self, z):
        """Scaled latents (B, embed_dim, h, w) -> images (B, 3, h*f, w*f), roughly [-1, 1], unclamped."""
        return self.decoder(self.post_quant_conv(z / self.scale_factor))

    def decode_tiled(self, z, tile: int = 64, overlap: int = 16):
        """Decode in overlapping latent tiles (tile/overlap in latent pixels) to bound memory.

        GroupNorm statistics and the mid attention see only one tile, so tiles disagree slightly
        at their borders; a linear ramp cross-fade over the overlap hides the seams.
        """
        f, (H, W) = self.downsample, z.shape[-2:]
        out = torch.zeros(z.shape[0], self.cfg.out_ch, H * f, W * f, device=z.device, dtype=z.dtype)
        wsum = torch.zeros_like(out[:1, :1])
        for y in _starts(H, tile, overlap):
            for x in _starts(W, tile, overlap):
                t = z[..., y:y + tile, x:x + tile]
                wy, wx = (_ramp(n * f, overlap * f, z) for n in t.shape[-2:])
                w = wy[:, None] * wx[None, :]  # (th*f, tw*f), > 0 everywhere
                ys, xs = slice(y * f, y * f + w.shape[0]), slice(x * f, x * f + w.shape[1])
                out[..., ys, xs] += self.decode(t) * w
                wsum[..., ys, xs] += w
        return out / wsum


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering [0, n); the last tile is shifted back to end exactly at n."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def _ramp(n: int, ramp: int, like: torch.Tensor) -> torch.Tensor:
    """1-D weights rising linearly from ~0 to 1 over `ramp` pixels at both ends of a tile."""
    i = torch.arange(n, device=like.device, dtype=like.dtype)
    return (torch.minimum(i + 1, n - i) / (ramp + 1)).clamp(max=1.0)
