"""Stable Diffusion UNet: LDM's openaimodel.UNetModel + attention.SpatialTransformer in plain PyTorch.

The module tree mirrors the original checkpoint, so the `model.diffusion_model.*` weights of an SD 1.x/2.x
.ckpt/.safetensors load with load_state_dict(strict=True) after stripping that prefix -- no rename table.
Indices such as `out_layers.3` or `ff.net.2` are positions in LDM's nn.Sequential containers; where LDM has
a weightless Dropout(p=0) we keep an nn.Identity so the indices after it stay the same.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)  # downsampling factors that get a SpatialTransformer
    num_heads: int = 8  # used when num_head_channels == -1 (SD1: 8 heads at every width)
    num_head_channels: int = -1  # fixed head width instead of a fixed head count (SD2: 64)
    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False  # SD2: proj_in/proj_out are Linear, not 1x1 Conv2d
    norm_groups: int = 32
    upcast_attention: bool = False  # run SDPA in fp32 (SD2.1-768-v overflows in fp16 otherwise)

    def __post_init__(self):  # JSON turns tuples into lists
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)


PRESETS: dict[str, UNetConfig] = {
    "sd15": UNetConfig(),
    # SD 2.x (512-base and 768-v share the UNet; 768-v differs only in the prediction target)
    "sd21": UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                       num_heads=-1, num_head_channels=16, context_dim=128, norm_groups=8),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """LDM sinusoidal embedding, [cos | sin] halves. t: (B,) float, may be fractional -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32, device=t.device))
    args = t.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch: int, out_ch: int, emb_ch: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb, context=None):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]  # time shift broadcast over H, W
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, ctx_dim: int, heads: int, dim_head: int, upcast: bool):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(ctx_dim, heads * dim_head, bias=False)
        self.to_v = nn.Linear(ctx_dim, heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim))  # LDM's to_out.1 is a weightless Dropout

    def forward(self, x, context=None):  # x: (B, N, dim); context: (B, M, ctx_dim), None = self-attention
        ctx = x if context is None else context
        q, k, v = (p.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, L, h*d) -> (B, h, L, d)
                   for p in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))
        if x.device.type == "cpu":  # on strided heads the CPU flash kernel is ~10% slower in bf16 at 4096
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # tokens (bench.py kernels); copies ~1%
        if self.upcast:
            with torch.autocast(x.device.type, enabled=False):  # else autocast would cast straight back down
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, h*d)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)  # value and gate halves in one matmul

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, ctx_dim: int, heads: int, dim_head: int, upcast: bool):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, upcast)  # self-attention over pixels
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, ctx_dim, heads, dim_head, upcast)  # pixels attend to text tokens
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        dim_head = ch // cfg.num_heads if cfg.num_head_channels == -1 else cfg.num_head_channels
        heads = ch // dim_head
        inner = heads * dim_head
        self.linear = cfg.use_linear_in_transformer
        self.norm = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6)  # LDM attention.Normalize: 1e-6, ResBlocks 1e-5
        self.proj_in = nn.Linear(ch, inner) if self.linear else nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, cfg.context_dim, heads, dim_head, cfg.upcast_attention)
            for _ in range(cfg.transformer_depth))
        self.proj_out = nn.Linear(inner, ch) if self.linear else nn.Conv2d(inner, ch, 1)

    def forward(self, x, emb, context):
        H, W = x.shape[2:]
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        # (B, C, H, W) -> (B, HW, C), copied once here (free for channels_last input): the residual adds
        # below keep the strides of their input, so a strided h would make every LayerNorm copy instead
        h = h.flatten(2).transpose(1, 2).contiguous()
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).unflatten(2, (H, W))  # back to (B, C, H, W): a channels_last-strided view
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(nearest_2x(x))


def nearest_2x(x):
    """F.interpolate(x, scale_factor=2, mode="nearest"), bit for bit, as a broadcast copy: under torch.compile on
    the CPU, inductor's bf16-autocast backward of upsample_nearest2d after a conv gave zero input gradients
    (torch 2.13: the whole UNet below the up path's first Upsample got none; tests/test_compile.py). The
    memory format is kept (channels_last in, channels_last out), as interpolate keeps it."""
    B, C, H, W = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = x.permute(0, 2, 3, 1)[:, :, None, :, None].expand(B, H, 2, W, 2, C)
        return y.reshape(B, 2 * H, 2 * W, C).permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(B, C, H, 2, W, 2).reshape(B, C, 2 * H, 2 * W)


class EmbedSequential(nn.Sequential):
    """LDM's TimestepEmbedSequential: hands emb/context only to the layers that use them."""

    def forward(self, x, emb, context, ckpt: bool = False):
        for layer in self:
            if not isinstance(layer, (ResBlock, SpatialTransformer)):
                x = layer(x)
            elif ckpt:  # recompute activations in backward instead of storing them
                x = checkpoint(layer, x, emb, context, use_reentrant=False)
            else:
                x = layer(x, emb, context)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        mc, emb_ch, g = cfg.model_channels, 4 * cfg.model_channels, cfg.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chs, ch, ds = [mc], mc, 1  # skip_chs: widths of the skips, popped by output_blocks
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * mc, emb_ch, g)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, cfg))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_chs.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(ResBlock(ch, ch, emb_ch, g), SpatialTransformer(ch, cfg),
                                            ResBlock(ch, ch, emb_ch, g))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), mult * mc, emb_ch, g)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, cfg))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x, t, context):
        """x: (B, in_ch, H, W) latents; t: (B,) or scalar timesteps, fractional ok; context: (B, 77, ctx_dim).
        H and W must be divisible by 2 ** (len(channel_mult) - 1). Returns (B, out_ch, H, W)."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))  # (B, 4*mc)
        context = context.to(x.dtype)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context, ckpt)
            skips.append(h)
        h = self.middle_block(h, emb, context, ckpt)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, ckpt)
        return self.out(h).contiguous()  # cpu_fast.enable's packed convs answer channels_last
