"""LoRA for the LDM-layout SD UNet, with the two settings of the Diff2Flow paper (arXiv 2506.02221).

A wrapped layer IS the original nn.Linear / nn.Conv2d (a subclass holding the very same weight and bias
Parameters), so `...attn1.to_q.weight` keeps its key and the LoRA factors sit beside it as
`...attn1.to_q.lora_down.weight`, `...lora_up.weight` and `...alpha`: the names the kohya/A1111 format uses.
Apply LoRA to a materialised model: on the meta device the factors' init (up = 0) and alpha are lost.
"""
import json
import math
import re
from dataclasses import asdict, dataclass, replace

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from common import atomic_path

# Target groups as patterns on the LDM module paths (UNet submodule names, prefix stripped).
PATTERNS = {
    "attn1": r"\.attn1\.to_[qkv]$",  # self-attention q/k/v
    "attn2": r"\.attn2\.to_[qkv]$",  # cross-attention q/k/v (k/v read the text context)
    "attn_out": r"\.attn[12]\.to_out\.0$",
    "ff": r"\.ff\.net\.(0\.proj|2)$",  # GEGLU in-projection (dim -> 2*4*dim) and out-projection
    "proj": r"\.proj_(in|out)$",  # SpatialTransformer in/out: nn.Linear in SD2.x, 1x1 nn.Conv2d in SD1.x
    "time": r"^time_embed\.[02]$|\.emb_layers\.1$",  # timestep MLP and the per-ResBlock time projections
}
# "conv": every other Conv2d -- ResBlock 3x3s, 1x1 skip connections, Downsample.op, Upsample.conv --
# except the first (input_blocks.0.0) and last (out.2) conv, which the presets train fully instead.
GROUPS = (*PATTERNS, "conv")
FIRST, LAST = "input_blocks.0.0", "out"  # the whole out block: GroupNorm out.0 + conv out.2
LORA_LEAVES = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass
class LoRAConfig:
    rank: float = 64  # int: fixed rank; float in (0, 1): ceil(rank * max(in, out)) per layer (paper's "20%")
    alpha: float | None = None  # scale = alpha / rank; None: alpha = rank, i.e. scale 1 (as the official code)
    targets: tuple = ("conv", "attn1", "attn2")
    dropout: float = 0.0  # on the LoRA branch's input only
    train_first_conv: bool = True  # train input_blocks.0.0 fully (e.g. a new input width for depth)
    train_last_block: bool = True  # train out.0 (GroupNorm) + out.2 fully

    def __post_init__(self):  # JSON turns tuples into lists
        self.targets = tuple(self.targets)
        assert set(self.targets) <= set(GROUPS), f"unknown LoRA targets {set(self.targets) - set(GROUPS)}"
        assert 0 < self.rank < 1 or self.rank == int(self.rank) >= 1, f"rank {self.rank}: int >= 1 or fraction"


# Both follow the official code's configs/lora/ (c0.2_fullA0.2_FL, c64_fullA64_m64_FL): "full attention" is
# q/k/v of attn1 AND attn2, "mlp" is proj_in/proj_out + ff; their attention out-projections stay frozen.
PRESETS: dict[str, LoRAConfig] = {
    # 217.4M trainable on SD2.1 (paper: 222M). Official rule = all Conv2d + q/k/v at 20%, which gives 207.5M
    # on SD2.1 because its proj_in/out are Linear; counting them as convs (they are 1x1 convs in LDM's
    # non-linear transformer) brings it within 2.1%.
    "base": LoRAConfig(rank=0.2, targets=("conv", "proj", "attn1", "attn2")),
    "small": LoRAConfig(rank=64, targets=("conv", "attn1", "attn2", "proj", "ff")),  # 61.5M (paper: 62M)
    # The official rule on SD2.x exactly (trainer_module.py add_lora_to_unet with c0.2_fullA0.2_FL): every Conv2d
    # but the first and the out block's + attn1/attn2 q/k/v, rank ceil(0.2 max(in, out)): 207.5M trainable on
    # SD2.1 (paper: 222M), whose proj_in/out are Linear and stay frozen. On SD1.x the official rule also wraps the
    # 1x1 proj convs: there it is `base`.
    "official": LoRAConfig(rank=0.2, targets=("conv", "attn1", "attn2")),
}


def parse_spec(spec: str) -> LoRAConfig:
    """train.py's --lora: a preset name, a rank (64) or a fraction (0.2) of each layer's width. ValueError
    with a one-line message otherwise."""
    if spec in PRESETS:
        return replace(PRESETS[spec])
    try:
        rank = float(spec)
    except ValueError:
        raise ValueError(f"unknown --lora {spec!r}: use a preset ({', '.join(PRESETS)}), a rank (e.g. 64) or a "
                         "fraction (e.g. 0.2)") from None
    if not (0 < rank < 1 or rank == int(rank) >= 1):
        raise ValueError(f"--lora {spec}: a rank must be an integer >= 1, a fraction must lie in (0, 1)")
    return LoRAConfig(rank=int(rank) if rank >= 1 else rank)


def lora_rank(rank: float, fan_in: int, fan_out: int) -> int:
    """Fraction -> ceil(frac * max(in, out)) as in the official code (a 1280-ch conv at 0.2 gets 256).
    The 1e-9 keeps float noise (e.g. 0.2 * 1280 = 256.00000000000003) from adding one."""
    return math.ceil(rank * max(fan_in, fan_out) - 1e-9) if rank < 1 else int(rank)


class LoRALayer:
    """Mixin for LoRALinear / LoRAConv2d: y = base(x) + up(down(dropout(x))) * alpha / rank."""

    def _add_lora(self, base: nn.Module, down: nn.Module, up: nn.Module, rank: int, alpha, dropout: float):
        self.weight, self.bias = base.weight, base.bias  # the original Parameters: same keys, no copy
        self.rank, self.merged = rank, False
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_down, self.lora_up = down, up  # Linear down: nn.Linear's default init (as the official)
        nn.init.zeros_(up.weight)  # a fresh LoRA is exactly the base layer
        # a buffer, not a float: travels in the state dict and is the kohya ".alpha" key
        self.register_buffer("alpha", torch.tensor(float(alpha or rank), device=base.weight.device))

    def forward(self, x):
        y = super().forward(x)
        if self.merged:
            return y
        return y + self.lora_up(self.lora_down(self.lora_dropout(x))) * (self.alpha / self.rank)

    def delta(self) -> torch.Tensor:
        """scale * up @ down in the base weight's shape. For conv the 1x1 up (out, r) contracts with the
        same-kernel down (r, in, kh, kw): by linearity that is one conv with the summed kernel."""
        d = self.lora_up.weight.flatten(1) @ self.lora_down.weight.flatten(1)  # (out, in*kh*kw)
        return d.view_as(self.weight) * (self.alpha / self.rank)

    @torch.no_grad()
    def merge(self):
        assert not self.merged, "LoRA already merged"
        self.weight += self.delta()
        self.merged = True


class LoRALinear(LoRALayer, nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha=None, dropout=0.0):
        # build the nn.Linear shell on meta (no allocation), then adopt base's Parameters
        super().__init__(base.in_features, base.out_features, base.bias is not None, device="meta")
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self._add_lora(base, nn.Linear(base.in_features, rank, **kw), nn.Linear(rank, base.out_features, **kw),
                       rank, alpha, dropout)


class LoRAConv2d(LoRALayer, nn.Conv2d):
    def __init__(self, base: nn.Conv2d, rank: int, alpha=None, dropout=0.0):
        b = base
        assert b.groups == 1 and b.dilation == (1, 1), "LoRA supports plain convs only"
        super().__init__(b.in_channels, b.out_channels, b.kernel_size, b.stride, b.padding,
                         bias=b.bias is not None, padding_mode=b.padding_mode, device="meta")
        kw = dict(bias=False, device=b.weight.device, dtype=b.weight.dtype)
        # down sees the same receptive field and stride as the base conv, up is a 1x1 mix (LoCon style)
        down = nn.Conv2d(b.in_channels, rank, b.kernel_size, b.stride, b.padding, padding_mode=b.padding_mode, **kw)
        nn.init.kaiming_normal_(down.weight, a=1)  # as the official LoRAConv: std 1/sqrt(fan_in) (default: 0.58/sqrt)
        self._add_lora(b, down, nn.Conv2d(rank, b.out_channels, 1, **kw), rank, alpha, dropout)


def target_group(name: str, module: nn.Module) -> str | None:
    for group, pattern in PATTERNS.items():
        if re.search(pattern, name):
            return group
    if isinstance(module, nn.Conv2d) and name not in (FIRST, LAST + ".2"):
        return "conv"
    return None


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the targeted layers in place; freeze everything except the LoRA factors and the fully trained
    layers. Returns the wrapped module names."""
    assert not any(isinstance(m, LoRALayer) for m in model.modules()), "model already has LoRA"
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and target_group(n, m) in cfg.targets]
    model.requires_grad_(False)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        base = model.get_submodule(name)
        wrap = LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear
        rank = lora_rank(cfg.rank, base.weight.shape[1], base.weight.shape[0])
        setattr(model.get_submodule(parent), leaf, wrap(base, rank, cfg.alpha, cfg.dropout))
    for prefix in full_train_prefixes(cfg):
        model.get_submodule(prefix).requires_grad_(True)
    model.lora_config = cfg  # lora_state_dict needs to know which layers were trained fully
    return names


def full_train_prefixes(cfg: LoRAConfig) -> list[str]:
    return [p for p, on in ((FIRST, cfg.train_first_conv), (LAST, cfg.train_last_block)) if on]


def is_lora_key(key: str) -> bool:
    return key.endswith(tuple("." + leaf for leaf in LORA_LEAVES))


def lora_state_dict(model: nn.Module) -> dict:
    """What training changes: the LoRA tensors + the fully trained layers (not the frozen base)."""
    full = tuple(p + "." for p in full_train_prefixes(model.lora_config))
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k) or k.startswith(full)}


def merge_lora(model: nn.Module):
    """W += scale * up @ down in every LoRA layer: inference at base speed, same outputs (dropout off)."""
    for m in model.modules():
        if isinstance(m, LoRALayer):
            m.merge()


def load_exact(model: nn.Module, sd: dict, expected, what: str):
    """load_state_dict for a known subset of keys: any missing/unexpected key is an error, never silent."""
    missing, unexpected = sorted(set(expected) - sd.keys()), sorted(sd.keys() - set(expected))
    if missing or unexpected:
        raise KeyError(f"{what}: missing keys {missing[:8]} ({len(missing)}), unexpected {unexpected[:8]} "
                       f"({len(unexpected)})")
    state = model.state_dict()  # shares storage with the parameters: copying into it loads them
    with torch.no_grad():
        for k, v in sd.items():
            state[k].copy_(v)


def save_lora(model: nn.Module, path: str, cfg: LoRAConfig, /, base: str = "", **extra):
    """safetensors with the config (JSON), the base model (path or repo id; sd.load follows it) and `extra`
    (e.g. objective=, prediction=, and cfg=, steps=: how to sample it) in the metadata. Atomic: temp file, then
    rename, fsynced. (model, path, cfg are positional-only, so `extra` may hold a key "cfg", the guidance scale.)"""
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    meta = {"lora_config": json.dumps(asdict(cfg)), "base_model": base, **{k: str(v) for k, v in extra.items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_lora(model: nn.Module, path: str) -> LoRAConfig:
    """Apply the saved config to a base model, then load exactly the saved LoRA/fully trained tensors."""
    try:
        with safe_open(path, "pt") as f:
            cfg = LoRAConfig(**json.loads((f.metadata() or {})["lora_config"]))
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise ValueError(f"{path}: not a LoRA .safetensors written by lora.save_lora ({type(e).__name__})") from None
    tensors = load_file(path)
    _fit_first_conv(model, tensors.get(FIRST + ".weight"))
    apply_lora(model, cfg)
    load_exact(model, tensors, lora_state_dict(model).keys(), f"LoRA file {path}")
    return cfg


def _fit_first_conv(model: nn.Module, w):
    """A fully trained first conv of another input width in the file (a depth LoRA's: noisy + image latent,
    8 channels) replaces the base's before loading; all its weights then come from the file."""
    old = model.get_submodule(FIRST)
    if w is None or w.shape == old.weight.shape:
        return
    new = nn.Conv2d(w.shape[1], old.out_channels, old.kernel_size, old.stride, old.padding,
                    device=old.weight.device, dtype=old.weight.dtype)
    parent, _, leaf = FIRST.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)
    if hasattr(model, "cfg"):  # sd.save records the config: the input width must match the weights
        model.cfg = type(model.cfg)(**{**vars(model.cfg), "in_channels": w.shape[1]})


def _split(key: str) -> tuple[str, str]:
    """'a.b.lora_up.weight' -> ('a.b', 'lora_up.weight'); 'a.b.bias' -> ('a.b', 'bias')."""
    leaf = next(s for s in (*LORA_LEAVES, "weight", "bias") if key.endswith("." + s))
    return key[: -len(leaf) - 1], leaf


def to_kohya(lora_sd: dict, base_sd: dict | None = None) -> dict:
    """kohya/A1111/ComfyUI keys: lora_unet_<LDM path with . -> _>.{lora_down.weight,lora_up.weight,alpha}.
    Fully trained layers have no low-rank form; they go out as the `.diff`/`.diff_b` (trained - base)
    keys that A1111 and ComfyUI also read, which needs the base state dict."""
    out = {}
    for key, v in lora_sd.items():
        path, leaf = _split(key)
        name = "lora_unet_" + path.replace(".", "_")
        if leaf in LORA_LEAVES:
            out[f"{name}.{leaf}"] = v
        else:
            assert base_sd is not None, f"{key} is fully trained: to_kohya needs base_sd to write its diff"
            out[f"{name}.{'diff' if leaf == 'weight' else 'diff_b'}"] = v - base_sd[key]
    return out


def from_kohya(kohya_sd: dict, base_sd: dict) -> dict:
    """Inverse of to_kohya. Module names contain underscores, so '_' -> '.' is resolved against the real
    module paths found in base_sd (the base UNet's state dict), not by string replacement."""
    paths = {k.rpartition(".")[0].replace(".", "_"): k.rpartition(".")[0] for k in base_sd}
    out = {}
    for key, v in kohya_sd.items():
        name, _, leaf = key.partition(".")
        path = paths[name.removeprefix("lora_unet_")]
        if leaf in ("diff", "diff_b"):
            k = path + (".weight" if leaf == "diff" else ".bias")
            out[k] = base_sd[k] + v
        else:
            out[f"{path}.{leaf}"] = v
    return out
