"""LoRA for the LDM-layout SD UNet, with the two settings of the Diff2Flow paper (arXiv 2506.02221).

A wrapped layer IS the original nn.Linear / nn.Conv2d (a subclass holding the very same weight and bias
Parameters), so `...attn1.to_q.weight` keeps its key and the LoRA factors sit beside it as
`...attn1.to_q.lora_down.weight`, `...lora_up.weight` and `...alpha`: the leaf names of kohya's format, whose
files (diffusers module names, `python lora.py export IN OUT`) to_kohya writes and merge_kohya reads.
Apply LoRA to a materialised model: on the meta device the factors' init (up = 0) and alpha are lost.
"""
import argparse
import json
import os
import math
import re
from dataclasses import asdict, dataclass, replace

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from common import atomic_path, fail, usage_error
from diffusers_format import LoadError, base_unet, diffusers_unet_key, find_in_hf_cache, unet_key_rules
from unet import UNetConfig

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
    if hasattr(model, "cfg"):  # the UNet's layout: what export_kohya needs to name the layers
        meta["unet_config"] = json.dumps(asdict(model.cfg))
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


# ----------------------------------------------------------------------------- kohya / A1111 / ComfyUI files
# kohya's SD1/SD2 trainer names a layer "lora_unet_" + its diffusers module path with '.' -> '_'
# (lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q) and a text-encoder layer "lora_te_" + its
# transformers CLIPTextModel path; diffusers' load_lora_weights, ComfyUI and A1111 read that form (and, on input,
# the LDM paths too). Each layer holds lora_down.weight (r, in[, kh, kw]), lora_up.weight (out, r[, 1, 1]) and
# optionally alpha: W += (alpha / r) * up @ down (scale 1 without alpha); a fully trained layer holds
# diff (= W_trained - W_base) and diff_b (the bias's).

KOHYA_UNET, KOHYA_TE = "lora_unet_", "lora_te_"
KOHYA_LEAVES = ("lora_down.weight", "lora_up.weight", "alpha", "diff", "diff_b")
# LyCORIS and other network kinds by a leaf of theirs: named in the error, not implemented.
OTHER_KINDS = {"hada_": "LoHa (LyCORIS hada_*)", "lokr_": "LoKr (LyCORIS lokr_*)", "oft_": "OFT (LyCORIS oft_*)",
               "lora_mid": "LoCon with a Tucker/CP core (LyCORIS lora_mid)", "dora_scale": "DoRA (dora_scale)",
               "w_norm": "LyCORIS norm (w_norm/b_norm)", "b_norm": "LyCORIS norm (w_norm/b_norm)",
               "a1.": "GLoRA (LyCORIS a1/a2/b1/b2)", "on_input": "(IA)^3 (LyCORIS on_input)",
               "weight": "(IA)^3 (LyCORIS .weight)"}
DIFFUSERS_NOTE = ("diffusers' load_lora_weights refuses .diff keys: for diffusers train with --lora-full none, "
                  "or export with --drop-diff (the LoRA alone); ComfyUI and A1111 apply them")


def _split(key: str) -> tuple[str, str]:
    """'a.b.lora_up.weight' -> ('a.b', 'lora_up.weight'); 'a.b.bias' -> ('a.b', 'bias')."""
    leaf = next(s for s in (*LORA_LEAVES, "weight", "bias") if key.endswith("." + s))
    return key[: -len(leaf) - 1], leaf


def kohya_unet_name(path: str, ucfg) -> str:
    """LDM module path of our UNet -> kohya's SD1/SD2 name (diffusers module path, '.' -> '_')."""
    return KOHYA_UNET + diffusers_unet_key(path + ".weight", *unet_key_rules(ucfg))[: -len(".weight")].replace(".", "_")


def to_kohya(lora_sd: dict, ucfg, base_sd: dict | None = None) -> dict:
    """Our LoRA state dict -> a kohya SD1/SD2 file's tensors. The scale alpha / rank is folded into lora_up and
    no alpha is written: diffusers misreads per-module alphas when ranks differ across layers (the `base`
    preset), while every tool applies a file without alphas exactly as up @ down. Fully trained layers go out
    as .diff/.diff_b = trained - base, which needs the base UNet's state dict (`base_sd`)."""
    out = {}
    for key, v in lora_sd.items():
        path, leaf = _split(key)
        name = kohya_unet_name(path, ucfg)
        if leaf == "lora_up.weight":
            rank = lora_sd[f"{path}.lora_down.weight"].shape[0]
            out[f"{name}.{leaf}"] = (v.float() * (lora_sd[f"{path}.alpha"].float() / rank)).to(v.dtype)
        elif leaf == "lora_down.weight":
            out[f"{name}.{leaf}"] = v
        elif leaf != "alpha":
            assert base_sd is not None, f"{key} is fully trained: to_kohya needs base_sd to write its diff"
            # A1111 maps conv_in/conv_out but not conv_norm_out to its layers; the LDM name, ComfyUI reads both
            name = KOHYA_UNET + "out_0" if name == KOHYA_UNET + "conv_norm_out" else name
            if base_sd[key].shape != v.shape:
                raise ValueError(f"{key} has shape {tuple(v.shape)}, the base's {tuple(base_sd[key].shape)} (a widened "
                                 "input conv, e.g. a depth LoRA's 8 channels): kohya/diffusers/ComfyUI/A1111 LoRAs "
                                 "cannot change a layer's shape; use this LoRA with our depth.py/sample.py")
            out[f"{name}.{'diff' if leaf == 'weight' else 'diff_b'}"] = (v.float() - base_sd[key].float()).to(v.dtype)
    return out


def is_kohya(keys) -> bool:
    return any(k.startswith((KOHYA_UNET, KOHYA_TE, "lora_te1_", "lora_te2_")) for k in keys)


def kohya_kind_error(keys, what: str) -> str | None:
    """A one-line refusal for a kohya-style file holding something other than plain LoRA/diff layers."""
    if any(k.startswith("lora_te2_") for k in keys):
        return f"{what}: an SDXL LoRA (lora_te2_ keys: a second text encoder); SDXL is not supported (SD 1.x/2.x only)"
    leaves = {k.partition(".")[2] for k in keys} - set(KOHYA_LEAVES)
    kinds = sorted({kind for leaf in leaves for mark, kind in OTHER_KINDS.items() if leaf.startswith(mark)})
    if kinds:
        return (f"{what}: holds {', '.join(kinds)} layers, which this code does not implement (plain LoRA/LoCon and "
                ".diff only); merge it into the checkpoint with the tool that made it")
    return f"{what}: unknown LoRA keys {sorted(leaves)[:4]}" if leaves else None


def _kohya_te_targets(te: nn.Module) -> dict:
    """kohya text-encoder names -> (weight, bias) views. SD1's modules are transformers' CLIPTextModel names
    already; SD2's (OpenCLIP layout) also answer to those, q/k/v being row blocks of the fused in_proj."""
    out = {KOHYA_TE + n.replace(".", "_"): (m.weight, getattr(m, "bias", None)) for n, m in te.named_modules()
           if isinstance(getattr(m, "weight", None), torch.Tensor)}
    if te.cfg.layout == "openclip":
        W = te.cfg.width
        for i, b in enumerate(te.transformer.resblocks):
            hf = f"{KOHYA_TE}text_model_encoder_layers_{i}_"
            for j, x in enumerate("qkv"):
                rows = slice(j * W, (j + 1) * W)
                out[f"{hf}self_attn_{x}_proj"] = (b.attn.in_proj_weight[rows], b.attn.in_proj_bias[rows])
            for name, m in (("self_attn_out_proj", b.attn.out_proj), ("mlp_fc1", b.mlp.c_fc), ("mlp_fc2", b.mlp.c_proj),
                            ("layer_norm1", b.ln_1), ("layer_norm2", b.ln_2)):
                out[hf + name] = (m.weight, m.bias)
    return out


def kohya_targets(unet: nn.Module, text_encoder: nn.Module | None = None) -> dict:
    """Every kohya name a layer of ours answers to -> its (weight, bias): UNet layers under both naming forms,
    diffusers module paths (kohya's trainer) and LDM paths (older tools)."""
    out = {}
    for n, m in unet.named_modules():
        if isinstance(getattr(m, "weight", None), torch.Tensor):
            wb = (m.weight, getattr(m, "bias", None))
            out[KOHYA_UNET + n.replace(".", "_")] = out[kohya_unet_name(n, unet.cfg)] = wb
    return {**out, **(_kohya_te_targets(text_encoder) if text_encoder is not None else {})}


def _kohya_te_name(key: str) -> str:
    """Text-encoder names as _kohya_te_targets knows them: diffusers' convert_state_dict_to_kohya writes an SD1/SD2
    encoder as lora_te1_ (SDXL's first one's name), and transformers >= 5.6 dropped CLIPTextModel's text_model."""
    key = KOHYA_TE + key.removeprefix("lora_te1_") if key.startswith("lora_te1_") else key
    if key.startswith(tuple(KOHYA_TE + p for p in ("encoder_layers_", "embeddings_", "final_layer_norm"))):
        key = KOHYA_TE + "text_model_" + key.removeprefix(KOHYA_TE)
    return key


def _kohya_delta(leaves: dict, w: torch.Tensor, name: str) -> torch.Tensor:
    """(alpha / r) * up @ down in w's shape (scale 1 without alpha), as diffusers/peft, ComfyUI and A1111 merge it."""
    down, up = leaves["lora_down.weight"].float(), leaves["lora_up.weight"].float()
    rank = down.shape[0]
    scale = leaves["alpha"].float().item() / rank if "alpha" in leaves else 1.0
    if up.shape[0] != w.shape[0] or up[0].numel() != rank or down[0].numel() != w[0].numel():
        raise ValueError(f"{name}: LoRA factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit the layer's "
                         f"{tuple(w.shape)}; a LoRA for another base model (SD1 vs SD2?)")
    return ((up.flatten(1) @ down.flatten(1)) * scale).reshape(w.shape)


@torch.no_grad()
def merge_kohya(tensors: dict, unet: nn.Module, text_encoder: nn.Module | None = None, what: str = "LoRA") -> int:
    """Merge a kohya/A1111/ComfyUI LoRA file's tensors into the UNet (and text encoder) in place: W += delta,
    b += diff_b. ValueError with one line for anything that does not fit. Returns the layers changed.
    Text-encoder layers past the ones we build (SD2's last block) cannot change SD's context: skipped."""
    if msg := kohya_kind_error(tensors, what):
        raise ValueError(msg)
    # diffusers' convert_state_dict_to_kohya names an SD1/SD2 text encoder lora_te1_ (SDXL's first one's name)
    tensors = {_kohya_te_name(k): v for k, v in tensors.items()}
    groups: dict[str, dict] = {}
    for k, v in tensors.items():
        name, _, leaf = k.partition(".")
        groups.setdefault(name, {})[leaf] = v
    targets = kohya_targets(unet, text_encoder)
    beyond = re.compile(rf"^{KOHYA_TE}text_model_encoder_layers_(\d+)_")
    blocks = text_encoder.cfg.blocks if text_encoder is not None else 0
    groups = {n: g for n, g in groups.items() if not ((m := beyond.match(n)) and int(m[1]) >= blocks)}
    unknown = sorted(set(groups) - targets.keys())
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} of {len(groups)} LoRA layers match no layer of this model, e.g. "
                         f"{unknown[:2]}; is it a LoRA for another base model (SD1/SD2/SDXL)?")
    for name, leaves in groups.items():
        w, b = targets[name]
        if ("lora_down.weight" in leaves) != ("lora_up.weight" in leaves):
            raise ValueError(f"{what}: {name} has only one of lora_down/lora_up; the file is incomplete")
        delta = _kohya_delta(leaves, w, name) if "lora_down.weight" in leaves else 0
        if "diff" in leaves:
            if leaves["diff"].shape != w.shape:
                raise ValueError(f"{name}.diff has shape {tuple(leaves['diff'].shape)}, the layer {tuple(w.shape)}; "
                                 "a LoRA for another base model (SD1 vs SD2?)")
            delta = delta + leaves["diff"].float()
        w += delta.to(w) if torch.is_tensor(delta) else delta
        if "diff_b" in leaves:
            b += leaves["diff_b"].to(b).reshape(b.shape)
    return len(groups)


def _base_path(lora_path: str, base: str) -> str:
    """The base a LoRA's metadata names, resolved as sd.load does: relative to the LoRA, as given, a cached repo."""
    local = os.path.join(os.path.dirname(os.path.abspath(lora_path)), base)
    if base and os.path.exists(local):
        return local
    if base and os.path.exists(base):
        return base
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base):
        return find_in_hf_cache(base)
    raise ValueError(f"{lora_path}: its base model {base!r} (metadata base_model) is not found; the fully trained "
                     "layers are written as differences to it (or pass --drop-diff)")


def export_kohya(src: str, dst: str, drop_diff: bool = False, overwrite: bool = False) -> str:
    """A LoRA file of ours (save_lora) -> a kohya SD1/SD2 file (to_kohya) at dst, atomically. Returns a one-line
    summary. ValueError/LoadError with one line: not our LoRA, base not found, a widened input conv."""
    with safe_open(src, "pt") as f:
        meta = f.metadata() or {}
    if "lora_config" not in meta:
        raise ValueError(f"{src}: not a LoRA written by train.py/lora.save_lora (no lora_config metadata)")
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"{dst} exists; remove it or pick another output name")
    tensors = load_file(src)
    full = [k for k in tensors if not is_lora_key(k)]
    tensors = {k: v for k, v in tensors.items() if not (drop_diff and k in full)}
    ucfg, base_sd = (UNetConfig(**json.loads(meta["unet_config"])), {}) if "unet_config" in meta else (None, {})
    if (full and not drop_diff) or ucfg is None:
        ucfg, base_sd = base_unet(_base_path(src, meta.get("base_model", "")), full if not drop_diff else [])
    kohya = to_kohya(tensors, ucfg, base_sd)
    info = {"ss_network_module": "networks.lora", "base_model": meta.get("base_model", ""),
            "exported_from": os.path.basename(src)}
    with atomic_path(dst) as tmp:
        save_file({k: v.contiguous() for k, v in kohya.items()}, tmp, metadata=info)
    n_diff = sum(k.endswith((".diff", ".diff_b")) for k in kohya)
    return (f"wrote {dst}: {sum(k.endswith('.lora_down.weight') for k in kohya)} LoRA layers in kohya's SD1/SD2 "
            f"naming (scale folded into lora_up)" + (f", {n_diff} .diff/.diff_b keys; {DIFFUSERS_NOTE}" if n_diff else
                                                     "; diffusers, ComfyUI and A1111 load it exactly"))


# ----------------------------------------------------------------------------- train.py's options and files, the program

FULL_CHOICES = {"first,last": (True, True), "first": (True, False), "none": (False, False)}


def config_from_args(spec: str, full: str, task: str) -> LoRAConfig:
    """train.py's --lora and --lora-full -> LoRAConfig; a usage error (exit 2) with one line otherwise."""
    try:
        cfg = parse_spec(spec)
    except ValueError as e:
        usage_error(str(e))
    if full not in FULL_CHOICES:
        usage_error(f"--lora-full {full!r}: use one of {', '.join(FULL_CHOICES)}")
    cfg.train_first_conv, cfg.train_last_block = FULL_CHOICES[full]
    if task == "depth" and not cfg.train_first_conv:  # the widened conv's new channels must train
        usage_error("--task depth widens the first conv: --lora-full must include 'first'")
    return cfg


def save_final(model: nn.Module, path: str, cfg: LoRAConfig, /, base: str = "", **extra) -> str:
    """train.py's final LoRA: save_lora at `path`, and beside it final_kohya.safetensors for diffusers, ComfyUI
    and A1111 (export_kohya). A depth LoRA's widened input conv has no kohya form: the reason is returned."""
    save_lora(model, path, cfg, base=base, **extra)
    try:
        return export_kohya(path, os.path.join(os.path.dirname(path), "final_kohya.safetensors"), overwrite=True)
    except (ValueError, LoadError) as e:
        return f"no final_kohya.safetensors: {e}"


def main(argv=None):
    """python lora.py export IN OUT [--drop-diff]: a LoRA of ours -> kohya's SD1/SD2 file."""
    p = argparse.ArgumentParser(prog="lora.py", description="Convert a LoRA written by train.py (lora.save_lora) to "
                                "kohya's SD1/SD2 format, which diffusers' load_lora_weights, ComfyUI and A1111 load.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="IN (ours) -> OUT (kohya .safetensors)")
    e.add_argument("src", metavar="IN")
    e.add_argument("dst", metavar="OUT")
    e.add_argument("--drop-diff", action="store_true", help="leave out the fully trained layers (.diff keys, which "
                   "diffusers refuses): the LoRA alone, for diffusers")
    args = p.parse_args(argv)
    if not os.path.exists(args.src):
        usage_error(f"{args.src}: no such file")
    try:
        print(export_kohya(args.src, args.dst, args.drop_diff))
    except (ValueError, LoadError, OSError, SafetensorError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
