"""Load Stable Diffusion 1.x / 2.x (and our own checkpoints) into unet.py, vae.py and clip_text.py.

    sd = load("v1-5-pruned-emaonly.safetensors")      # original single file (.safetensors or .ckpt)
    sd = load("path/to/stable-diffusion-2-1")          # a diffusers folder (model_index.json, unet/, ...)
    sd = load("stabilityai/stable-diffusion-2-1")      # a repo already in the local Hugging Face cache
    sd = load("v1-5-pruned-emaonly.safetensors", lora_file="style.safetensors")  # + a LoRA (ours or kohya's)
    ctx = sd.encode_prompt(["a photo of a cat"])       # (B, 77, 768 | 1024)

Our modules mirror the original LDM module tree, so an original checkpoint loads with
`load_state_dict(strict=True)` after stripping one prefix per model (PREFIX below). This file holds
that single-file format, our own files (the same layout plus metadata, save()) and SD's schedule
(`sd_alphas_cumprod`); diffusers folders and the Hugging Face cache are read by diffusers_format.py.
Nothing here touches the network: a repo id is only looked up in the local cache.
"""
import dataclasses
import json
import os
import re
import struct
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import save_file

import clip_text
import diff2flow
import diffusers_format
import lora
import unet as unet_mod
import vae as vae_mod
from common import atomic_path
from diffusers_format import LoadError, find_in_hf_cache, hf_cache_dir  # noqa: F401 (public through sd)

PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
          "sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model."}
FORMAT = "diff2flow-minimal"  # metadata tag of checkpoints written by save()
DECODER = ("decoder.", "post_quant_conv.")  # the VAE's way from latents to pixels (save(..., own_vae="decoder"))
OWN_VAE = {"": (), "decoder": DECODER, "all": ("",)}  # save(..., own_vae=...): what a UNet-only file carries


def sd_alphas_cumprod(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """abar_t = prod_{i<=t} (1 - beta_i) of SD's "scaled linear" betas (linear in sqrt(beta)), float64.
    Part of the checkpoint format: original single files may omit it, diffusers folders give only betas."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@dataclass
class SD:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: clip_text.Tokenizer
    version: str                    # "sd1" | "sd2" (text encoder family)
    prediction: str                 # "eps" | "v": what the UNet outputs
    alphas_cumprod: torch.Tensor    # (T,) float64, the schedule the UNet was trained with
    objective: str = "diffusion"    # what trained the UNet: diffusion | diff2flow | fm | fm_dm_direction
    name: str = ""
    meta: dict = dataclasses.field(default_factory=dict)  # the file's string metadata (e.g. resolution)

    @torch.no_grad()
    def encode_prompt(self, prompts):
        """Prompts (str or list) -> text context (B, 77, width) in the text encoder's dtype."""
        ids = self.tokenizer(prompts).to(next(self.text_encoder.parameters()).device)
        return self.text_encoder(ids)


# ----------------------------------------------------------------------------- reading tensors

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_header(f, path):
    """(tensor entries, metadata, offset of the data) of an open .safetensors file, checked against its size."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 2 <= n <= min(size - 8, 100 << 20):
        raise LoadError(f"{path}: not a safetensors file (bad header); pass a .safetensors, .ckpt or diffusers folder")
    try:
        header = json.loads(f.read(n))
    except ValueError:
        raise LoadError(f"{path}: not a safetensors file (header is not JSON)") from None
    meta = header.pop("__metadata__", None) or {}
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise LoadError(f"{path}: truncated ({size} bytes, header says {8 + n + end}); re-download or re-copy the file")
    return header, meta, 8 + n


def safetensors_metadata(path):
    """A .safetensors file's string metadata; its tensors are not read."""
    with open(path, "rb") as f:
        return _safetensors_header(f, path)[1]


# Read by hand with plain reads, not safetensors' safe_open, for memory: safe_open memory-maps the file, and
# mapped pages count as resident, so mapping + casting an fp32 SD1.5 file to bf16 peaked at 1.56x the file
# size (bench/bench.py --only load); reading into the final tensors and casting them one at a time, 0.62x.
def read_safetensors(path, dtype=None):
    """Read a .safetensors file tensor by tensor -> (dict, metadata); floating tensors cast to `dtype`."""
    with open(path, "rb") as f:
        header, meta, data = _safetensors_header(f, path)
        out = {}
        for key, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            t = torch.empty(v["shape"], dtype=_ST_DTYPES[v["dtype"]])
            f.seek(data + v["data_offsets"][0])
            f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else bytearray())
            out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out, meta


class _Inert:
    """Stand-in for training-bookkeeping classes pickled into .ckpt files (Lightning callbacks):
    it only stores the state it is given, so no code from the file ever runs."""
    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


# Globals that real SD .ckpt files contain beside the weights; replaced by _Inert, never imported.
_BOOKKEEPING = re.compile(r"^(pytorch_lightning|lightning|lightning_fabric)\.")


def read_ckpt(path, dtype=None):
    """Read a pickled .ckpt with weights_only=True: only tensors and plain containers are rebuilt."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:
        raise LoadError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}); pass a .safetensors, .ckpt or diffusers folder") from None
    bad = [g for g in unsafe if not _BOOKKEEPING.match(g)]
    if bad:
        raise LoadError(f"{path}: refusing to load, the pickle references code ({', '.join(bad[:3])}); "
                        "only tensors are allowed (convert it to .safetensors with a tool you trust)")
    with torch.serialization.safe_globals([(_Inert, g) for g in unsafe]):
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    meta = obj.get("d2f_meta", {}) if isinstance(obj, dict) else {}
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise LoadError(f"{path}: no state_dict of tensors inside; is this a model checkpoint?")
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return sd, meta


def read_tensors(path, dtype=None):
    if path.endswith(".safetensors"):
        return read_safetensors(path, dtype)
    if path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        return read_ckpt(path, dtype)
    raise LoadError(f"{path}: unknown checkpoint type; expected .safetensors, .ckpt or a diffusers folder")


# ----------------------------------------------------------------------------- building models

def _build(cls, cfg, sd, what, path):
    """Build `cls(cfg)` without allocating, then adopt the tensors of `sd` (strict: names must match)."""
    with torch.device("meta"):
        model = cls(cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise LoadError(f"{path}: the {what} weights do not fit this architecture: missing {len(missing)} "
                        f"keys {missing[:3]}, unexpected {len(unexpected)} keys {unexpected[:3]}; "
                        "is it a Stable Diffusion 1.x/2.x checkpoint?")
    shapes = [(k, tuple(v.shape), tuple(sd[k].shape)) for k, v in model.state_dict().items() if v.shape != sd[k].shape]
    if shapes:
        k, want, got = shapes[0]
        raise LoadError(f"{path}: the {what} weight {k} has shape {got}, expected {want} "
                        f"({len(shapes)} mismatches); wrong architecture or config")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


SDXL = "SDXL is not supported (SD 1.x/2.x only)"


def _foreign(sd, path):
    """What a file without an SD 1.x/2.x UNet holds, as the one-line message saying what to do; None if unknown."""
    has = lambda *names: any(k.startswith(names) for k in sd)
    if has("lora_te2_", "conditioner.embedders.", "add_embedding.", PREFIX["unet"] + "label_emb."):
        return f"{path}: an SDXL model or LoRA; {SDXL}"
    if lora.is_kohya(sd):
        return f"{path}: a kohya/A1111 LoRA, not a model; pass the base SD checkpoint as --ckpt and this file as --lora"
    if any(".lora_A." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in sd):
        return (f"{path}: a diffusers/peft LoRA (lora_A/lora_B keys); convert it to kohya's format "
                "(diffusers.utils.convert_state_dict_to_kohya) and pass it with --lora beside the base as --ckpt")
    if has("conv_in.weight", "down_blocks.") and has("time_embedding."):
        return (f"{path}: a diffusers-format UNet alone (unet/diffusion_pytorch_model.safetensors); pass the "
                "diffusers folder that holds model_index.json, unet/, vae/ and text_encoder/")
    if has("encoder.", "first_stage_model.encoder.") and has("decoder.", "first_stage_model.decoder."):
        return (f"{path}: a VAE alone (no UNet or text encoder); pass a full SD 1.x/2.x checkpoint as --ckpt "
                "(its own VAE is used; swapping in a separate VAE is not supported)")
    return None


def _detect_version(sd, path):
    key = PREFIX["unet"] + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if key not in sd:
        if msg := _foreign(sd, path):
            raise LoadError(msg)
        if not any(k.startswith(PREFIX["unet"]) for k in sd):
            raise LoadError(f"{path}: no Stable Diffusion UNet inside (no '{PREFIX['unet']}' keys); "
                            "pass an SD 1.x/2.x checkpoint")
        raise LoadError(f"{path}: UNet has no cross-attention at the first level ({key}); not SD 1.x/2.x")
    width = sd[key].shape[1]
    if width not in (768, 1024):
        raise LoadError(f"{path}: text context width {width} is neither SD1's 768 nor SD2's 1024")
    return "sd1" if width == 768 else "sd2"


def _guess_prediction(path, version):
    """Original single files do not record eps vs v; SD's own naming does ("768-v", "v2-1_768")."""
    name = os.path.basename(path).lower()
    if version == "sd2" and ("768" in name or re.search(r"(^|[-_])v([-_.]|pred)", name)):
        return "v"
    if version == "sd2":
        warnings.warn(f"{name}: assuming eps-prediction (SD 2.x 512-base); pass prediction='v' for a 768-v model")
    return "eps"


def _configs(version, in_channels, out_channels):
    ucfg = dataclasses.replace(unet_mod.PRESETS["sd15" if version == "sd1" else "sd21"],
                               in_channels=in_channels, out_channels=out_channels)
    return ucfg, vae_mod.PRESETS["sd"], clip_text.PRESETS[version]


# Config fields that our older files store but the configs no longer have (double_z: always True).
_RETIRED = {vae_mod.VAEConfig: ("double_z",)}


def _config(cls, text):
    """A config from the JSON that metadata() wrote (asdict of it), in this or an older version."""
    fields = json.loads(text)
    for name in _RETIRED.get(cls, ()):
        fields.pop(name, None)
    return cls(**fields)


def _own_configs(meta):
    return (_config(unet_mod.UNetConfig, meta["unet_config"]), _config(vae_mod.VAEConfig, meta["vae_config"]),
            _config(clip_text.TextConfig, meta["text_config"]))


def _split_models(sd, version, tcfg):
    """One original-layout state dict -> the UNet's, the VAE's and the text encoder's, prefixes stripped."""
    text_sd = _strip(sd, PREFIX[version])
    unused = set(clip_text.unused_keys(tcfg, text_sd))  # documented in clip_text: SD2's last block etc.
    text_sd = {k: v for k, v in text_sd.items() if k not in unused}
    # some exports store the VAE's 1x1 attention convs as linear weights
    vae_sd = {k: (v[:, :, None, None] if v.ndim == 2 and ".attn_1." in k else v)
              for k, v in _strip(sd, PREFIX["vae"]).items()}
    return _strip(sd, PREFIX["unet"]), vae_sd, text_sd


def _tokenizer(version):
    return clip_text.Tokenizer(pad_id=49407 if version == "sd1" else 0)


def _bundle(configs, weights, path, **fields):
    """The three models built from their configs and state dicts -> SD bundle with `fields`."""
    (ucfg, vcfg, tcfg), (unet_sd, vae_sd, text_sd) = configs, weights
    return SD(unet=_build(unet_mod.UNet, ucfg, unet_sd, "UNet", path),
              vae=_build(vae_mod.AutoencoderKL, vcfg, vae_sd, "VAE", path),
              text_encoder=_build(clip_text.TextEncoder, tcfg, text_sd, "text encoder", path),
              name=os.path.basename(path.rstrip("/")), **fields)


def _from_tensors(sd, meta, path, prediction, objective):
    """Original-layout tensors (+ our metadata, if written by save()) -> SD bundle."""
    if meta.get("format") == FORMAT:
        version, configs = meta["version"], _own_configs(meta)
        prediction, objective = prediction or meta["prediction"], objective or meta.get("objective")
    else:
        version = _detect_version(sd, path)
        w_in, w_out = sd[PREFIX["unet"] + "input_blocks.0.0.weight"], sd[PREFIX["unet"] + "out.2.weight"]
        configs = _configs(version, w_in.shape[1], w_out.shape[0])
        prediction = prediction or _guess_prediction(path, version)
    if depth := [k for k in sd if k.startswith("depth_model.")]:
        warnings.warn(f"{path}: an SD2 depth2img checkpoint: its {len(depth)} depth_model.* keys (the MiDaS depth "
                      f"estimator) are not loaded; its UNet takes {configs[0].in_channels} input channels, the "
                      "latent's 4 and a depth map you provide")
    abar = sd.get("alphas_cumprod")
    return _bundle(configs, _split_models(sd, version, configs[2]), path, tokenizer=_tokenizer(version),
                   version=version, prediction=prediction, objective=objective or "diffusion", meta=meta,
                   alphas_cumprod=abar.double() if abar is not None else sd_alphas_cumprod())


def _load_diffusers(folder, dtype, prediction, objective):
    """A diffusers folder (read by diffusers_format with our tensor reader) -> SD bundle."""
    f = diffusers_format.read_folder(folder, lambda path: read_tensors(path, dtype)[0])
    return _bundle(f.configs, f.weights, folder, tokenizer=f.tokenizer, version=f.version,
                   prediction=prediction or f.prediction, objective=objective or "diffusion",
                   alphas_cumprod=sd_alphas_cumprod(**f.schedule))


def _component_folder(folder):
    """A diffusers component folder (config.json + weights) given for a pipeline: its pipeline folder if it sits in
    one (with a warning), else a one-line LoadError saying what it is."""
    c = diffusers_format._load_json(os.path.join(folder, "config.json"))
    kind, parent = c.get("_class_name", "a diffusers model"), os.path.dirname(os.path.abspath(folder))
    if c.get("addition_embed_type") == "text_time" or c.get("cross_attention_dim") == 2048:
        raise LoadError(f"{folder}: an SDXL UNet; {SDXL}")
    if os.path.exists(os.path.join(parent, "model_index.json")):
        warnings.warn(f"{folder}: a diffusers {kind} folder; loading the pipeline folder around it, {parent}")
        return parent
    raise LoadError(f"{folder}: a diffusers {kind} folder alone; pass the diffusers pipeline folder that holds "
                    "model_index.json, unet/, vae/ and text_encoder/")


def _single_file_in(folder):
    files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".ckpt")))
    st = [f for f in files if f.endswith(".safetensors")] or files
    if len(st) != 1:
        raise LoadError(f"{folder}: {'no' if not st else len(st)} checkpoint files {st[:4]}; pass one file's path")
    return os.path.join(folder, st[0])


# ----------------------------------------------------------------------------- public API

def load(path, device="cpu", dtype=torch.float32, prediction=None, objective=None, lora_file=None):
    """Load SD from a single file, a diffusers folder or a cached repo id -> SD bundle.

    prediction: force "eps" or "v" (original single files do not say; diffusers folders and our
    own checkpoints do). dtype: the weights' dtype; each tensor is cast as it is read.
    lora_file: a LoRA (ours or a kohya/A1111 file) merged into the loaded model (apply_lora).
    """
    if prediction not in (None, "eps", "v"):
        raise LoadError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith("."):
            path = find_in_hf_cache(path)
        else:
            raise LoadError(f"{path}: no such file or folder; pass a .safetensors/.ckpt file, a diffusers folder or a cached repo id")
    if os.path.isfile(path) and diffusers_format.WEIGHTS.match(os.path.basename(path)) and \
            os.path.exists(os.path.join(os.path.dirname(path), "config.json")):  # unet/diffusion_pytorch_model.*
        path = _component_folder(os.path.dirname(path))
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "model_index.json")):
        path = _component_folder(path) if os.path.exists(os.path.join(path, "config.json")) else _single_file_in(path)
    sd = follow_schedule(_load_resolved(path, dtype, prediction, objective), None)
    if lora_file:
        apply_lora(sd, lora_file)
    if dtype == torch.float16 and sd.version == "sd2":  # SD2's attention logits overflow fp16 (black images)
        sd.unet.cfg.upcast_attention = True
        for m in sd.unet.modules():
            if hasattr(m, "upcast"):
                m.upcast = True
    for m in (sd.unet, sd.vae, sd.text_encoder):
        m.to(device)
    return sd


def follow_schedule(sd, meta=None):
    """Zero terminal SNR where the metadata (default: the bundle's) says the UNet was trained with it (train.py
    --zero-terminal-snr records it): a LoRA's or UNet-only file's base brings SD's schedule. Idempotent."""
    if (sd.meta if meta is None else meta).get("zero_terminal_snr") == "True":
        sd.alphas_cumprod = diff2flow.rescale_zero_terminal_snr(sd.alphas_cumprod)
    return sd


def _load_resolved(path, dtype, prediction, objective):
    if os.path.isdir(path):
        return _load_diffusers(path, dtype, prediction, objective)
    if path.endswith(".safetensors"):
        meta = safetensors_metadata(path)
        if "lora_config" in meta:  # a LoRA file names its base; lora.load_lora reads the LoRA's tensors
            return _load_lora_file(path, meta, dtype, prediction, objective)
    tensors, meta = read_tensors(path, dtype)
    if meta.get("base_model"):  # a UNet-only file (save(..., base=...)): VAE and text from the base
        return _load_unet_file(path, tensors, meta, dtype, prediction, objective)
    return _from_tensors(tensors, meta, path, prediction, objective)


def _load_base(path, meta, dtype, prediction, objective):
    """The base a LoRA or UNet-only file names: a path relative to that file, an absolute path or a repo id."""
    base = meta.get("base_model", "")
    if not base:
        raise LoadError(f"{path}: a LoRA file without a base model in its metadata; load the base and use lora.load_lora")
    local = os.path.join(os.path.dirname(os.path.abspath(path)), base)
    try:
        return load(local if os.path.exists(local) else base, "cpu", dtype, prediction or meta.get("prediction"),
                    objective or meta.get("objective"))
    except LoadError as e:
        raise LoadError(f"{path}: cannot load the base model its metadata names ({e})") from None


def _named(sd, path, meta):
    sd.name, sd.meta = os.path.basename(path), {**sd.meta, **meta}
    return sd


def _load_unet_file(path, tensors, meta, dtype, prediction, objective):
    """A fine-tuned UNet saved beside the base it came from (save(..., base=...)): the VAE and the text
    encoder are the base's, so the file holds only what training changed."""
    sd = _load_base(path, meta, dtype, prediction, objective)
    ucfg = _config(unet_mod.UNetConfig, meta["unet_config"])
    sd.unet = _build(unet_mod.UNet, ucfg, _strip(tensors, PREFIX["unet"]), "UNet", path)
    own = _strip(tensors, PREFIX["vae"])
    if own:  # save(..., own_vae=...): this model's own VAE decoder, or whole VAE, over the base's
        sd.vae = _own_vae(sd.vae, own, meta, path)
    sd.objective = objective or meta.get("objective", sd.objective)
    sd.prediction = prediction or meta.get("prediction", sd.prediction)
    return _named(sd, path, meta)


def _own_vae(base_vae, own, meta, path):
    """The VAE of a UNet-only file that carries its own: the whole VAE (its config from the file, scale_factor
    included) or the decoder over the base's encoder; anything else is a file written wrong."""
    keys = set(base_vae.state_dict())
    if own.keys() == keys and "vae_config" in meta:
        return _build(vae_mod.AutoencoderKL, _config(vae_mod.VAEConfig, meta["vae_config"]), own, "VAE", path)
    if own.keys() == {k for k in keys if k.startswith(DECODER)}:
        return _build(vae_mod.AutoencoderKL, base_vae.cfg, {**base_vae.state_dict(), **own}, "VAE", path)
    raise LoadError(f"{path}: holds part of a VAE ({len(own)} tensors), neither its decoder nor all of it; re-save it")


def _load_lora_file(path, meta, dtype, prediction, objective):
    """A LoRA .safetensors written by lora.save_lora: its metadata names the base checkpoint (a path,
    relative to the LoRA file, or a repo id) and what trained it. The LoRA is merged for speed."""
    sd = _load_base(path, meta, dtype, prediction, objective)
    lora.load_lora(sd.unet, path)
    lora.merge_lora(sd.unet)
    return _named(sd, path, meta)


def apply_lora(sd, path):
    """Merge a LoRA file into the bundle in place: ours (lora.save_lora: the UNet, its config in the metadata) or a
    kohya/A1111/ComfyUI file (lora_unet_* / lora_te_*: UNet and text encoder, merged as diffusers merges it)."""
    path = os.fspath(path)
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        raise LoadError(f"{path}: a LoRA must be an existing .safetensors file")
    if "lora_config" in safetensors_metadata(path):
        lora.load_lora(sd.unet, path)
        lora.merge_lora(sd.unet)  # W += up @ down: the LoRA then costs nothing per step
        return follow_schedule(sd, safetensors_metadata(path))  # trained with zero terminal SNR?
    tensors, _ = read_safetensors(path)
    if not lora.is_kohya(tensors):
        raise LoadError(f"{path}: not a LoRA (neither lora.save_lora's metadata nor kohya's lora_unet_/lora_te_ keys); "
                        f"{_foreign(tensors, path) or 'pass a LoRA file'}")
    try:
        lora.merge_kohya(tensors, sd.unet, sd.text_encoder, path)
    except ValueError as e:
        raise LoadError(str(e)) from None
    return sd


def state_dict(sd):
    """The bundle's weights in the ORIGINAL single-file layout (what SD's own code and A1111 read)."""
    out = {PREFIX["unet"] + k: v for k, v in sd.unet.state_dict().items()}
    out.update({PREFIX["vae"] + k: v for k, v in sd.vae.state_dict().items()})
    out.update({PREFIX[sd.version] + k: v for k, v in sd.text_encoder.state_dict().items()})
    out["alphas_cumprod"] = sd.alphas_cumprod.float()
    return out


def metadata(sd, **extra):
    """String metadata that lets load() rebuild exactly this bundle (configs, prediction, objective)."""
    cfg = lambda m: json.dumps(dataclasses.asdict(m.cfg))
    meta = {"format": FORMAT, "version": sd.version, "prediction": sd.prediction, "objective": sd.objective,
            "unet_config": cfg(sd.unet), "vae_config": cfg(sd.vae), "text_config": cfg(sd.text_encoder)}
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def save(sd, path, dtype=None, base=None, own_vae="", **extra):
    """Write the bundle as one original-layout .safetensors or .ckpt, atomically (common.atomic_path).

    base: the checkpoint this one was fine-tuned from (a path relative to `path`, absolute, or a repo
    id). Then only the UNet is written and load() takes the VAE and text encoder from the base;
    own_vae="decoder" or "all" writes that much of the VAE too (a model that tuned it: toy/depth_vae.py)."""
    keep = (PREFIX["unet"],) + tuple(PREFIX["vae"] + part for part in OWN_VAE[own_vae])
    tensors = {k: (v.to(dtype) if dtype and v.is_floating_point() and k != "alphas_cumprod" else v).contiguous().cpu()
               for k, v in state_dict(sd).items() if not base or k.startswith(keep)}
    if base:
        extra["base_model"] = base
    with atomic_path(path) as tmp:
        if path.endswith(".safetensors"):
            save_file(tensors, tmp, metadata=metadata(sd, **extra))
        else:
            torch.save({"state_dict": tensors, "d2f_meta": metadata(sd, **extra)}, tmp)


def create(unet="tiny", vae="tiny", text="tiny", version="sd1", prediction="v", alphas_cumprod=None):
    """A freshly initialised bundle from preset names or configs (our tiny family starts here)."""
    pick = lambda presets, c: dataclasses.replace(presets[c] if isinstance(c, str) else c)  # a copy: never mutate PRESETS
    ucfg, vcfg, tcfg = pick(unet_mod.PRESETS, unet), pick(vae_mod.PRESETS, vae), pick(clip_text.PRESETS, text)
    return SD(unet=unet_mod.UNet(ucfg), vae=vae_mod.AutoencoderKL(vcfg), text_encoder=clip_text.TextEncoder(tcfg),
              tokenizer=_tokenizer(version), version=version,
              prediction=prediction, alphas_cumprod=sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
