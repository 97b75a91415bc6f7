"""Load Stable Diffusion 1.x / 2.x (and our own checkpoints) into unet.py, vae.py and clip_text.py.

    sd = load("v1-5-pruned-emaonly.safetensors")      # original single file (.safetensors or .ckpt)
    sd = load("path/to/stable-diffusion-2-1")          # a diffusers folder (model_index.json, unet/, ...)
    sd = load("stabilityai/stable-diffusion-2-1")      # a repo already in the local Hugging Face cache
    ctx = sd.encode_prompt(["a photo of a cat"])       # (B, 77, 768 | 1024)

Our modules mirror the original LDM module tree, so an original checkpoint loads with
`load_state_dict(strict=True)` after stripping one prefix per model (PREFIX below). The diffusers
folder format is mapped to those keys by a few rules (`_unet_key`, `_vae_key`), never a table.
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

import clip_text
import unet as unet_mod
import vae as vae_mod

PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
          "sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model."}
FORMAT = "diff2flow-minimal"  # metadata tag of checkpoints written by save()


def sd_alphas_cumprod(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """abar_t = prod_{i<=t} (1 - beta_i) of SD's "scaled linear" betas (linear in sqrt(beta)), float64.
    Part of the checkpoint format: original single files may omit it, diffusers folders give only betas."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


class LoadError(RuntimeError):
    """A checkpoint could not be loaded; the message is one line saying what to do."""


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


def read_safetensors(path, dtype=None):
    """Read a .safetensors file tensor by tensor -> (dict, metadata).

    We parse the (tiny, documented) format ourselves with plain reads instead of memory-mapping:
    mapped pages count as resident memory, so mmap + copy peaks at ~2x the file size, while this
    peaks at the loaded weights plus one tensor. Floating tensors are cast to `dtype` one at a time,
    so loading an fp32 file in bf16 never holds a full fp32 copy.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
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
        out = {}
        for key, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, stop = v["data_offsets"]
            t = torch.empty(v["shape"], dtype=_ST_DTYPES[v["dtype"]])
            f.seek(8 + n + start)
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


def _detect_version(sd, path):
    key = PREFIX["unet"] + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if key not in sd:
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


def _from_tensors(sd, meta, path, prediction, objective):
    """Original-layout tensors (+ our metadata, if written by save()) -> SD bundle."""
    if meta.get("format") == FORMAT:
        ucfg = unet_mod.UNetConfig(**json.loads(meta["unet_config"]))
        vcfg = vae_mod.VAEConfig(**json.loads(meta["vae_config"]))
        tcfg = clip_text.TextConfig(**json.loads(meta["text_config"]))
        version, pred = meta["version"], meta["prediction"]
        objective = objective or meta.get("objective", "diffusion")
    else:
        version = _detect_version(sd, path)
        w_in, w_out = sd[PREFIX["unet"] + "input_blocks.0.0.weight"], sd[PREFIX["unet"] + "out.2.weight"]
        ucfg, vcfg, tcfg = _configs(version, w_in.shape[1], w_out.shape[0])
        pred = None if prediction else _guess_prediction(path, version)
    text_sd = _strip(sd, PREFIX[version])
    unused = set(clip_text.unused_keys(tcfg, text_sd))  # documented in clip_text: SD2's last block etc.
    text_sd = {k: v for k, v in text_sd.items() if k not in unused}
    vae_sd = _strip(sd, PREFIX["vae"])
    for k, v in vae_sd.items():  # some exports store the VAE's 1x1 attention convs as linear weights
        if v.ndim == 2 and ".attn_1." in k:
            vae_sd[k] = v[:, :, None, None]
    abar = sd.get("alphas_cumprod")
    return SD(unet=_build(unet_mod.UNet, ucfg, _strip(sd, PREFIX["unet"]), "UNet", path),
              vae=_build(vae_mod.AutoencoderKL, vcfg, vae_sd, "VAE", path),
              text_encoder=_build(clip_text.TextEncoder, tcfg, text_sd, "text encoder", path),
              tokenizer=clip_text.Tokenizer(pad_id=49407 if version == "sd1" else 0),
              version=version, prediction=prediction or pred,
              alphas_cumprod=abar.double() if abar is not None else sd_alphas_cumprod(),
              objective=objective or "diffusion", name=os.path.basename(path.rstrip("/")), meta=meta)


# ----------------------------------------------------------------------------- diffusers folders

def _unet_key(k, L, up_has_attn):
    """diffusers UNet2DConditionModel key -> LDM key. L = layers_per_block (resnets per level)."""
    r = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
         "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for a, b in r.items():
        if k.startswith(a):
            return b + k[len(a):]
    k = re.sub(r"resnets\.(\d+)\.norm1", r"resnets.\1.in_layers.0", k)
    k = re.sub(r"resnets\.(\d+)\.conv1", r"resnets.\1.in_layers.2", k)
    k = re.sub(r"resnets\.(\d+)\.time_emb_proj", r"resnets.\1.emb_layers.1", k)
    k = re.sub(r"resnets\.(\d+)\.norm2", r"resnets.\1.out_layers.0", k)
    k = re.sub(r"resnets\.(\d+)\.conv2", r"resnets.\1.out_layers.3", k)
    k = re.sub(r"resnets\.(\d+)\.conv_shortcut", r"resnets.\1.skip_connection", k)
    # Each down level holds L (resnet, attention) blocks then one downsampler; each up level L+1 and an upsampler.
    k = re.sub(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
               lambda m: f"input_blocks.{int(m[1]) * (L + 1) + int(m[3]) + 1}.{0 if m[2] == 'resnets' else 1}.", k)
    k = re.sub(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
               lambda m: f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.", k)
    k = re.sub(r"^mid_block\.resnets\.(\d+)\.", lambda m: f"middle_block.{2 * int(m[1])}.", k)
    k = re.sub(r"^mid_block\.attentions\.0\.", "middle_block.1.", k)
    k = re.sub(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
               lambda m: f"output_blocks.{int(m[1]) * (L + 1) + int(m[3])}.{0 if m[2] == 'resnets' else 1}.", k)
    return re.sub(r"^up_blocks\.(\d+)\.upsamplers\.0\.",
                  lambda m: f"output_blocks.{int(m[1]) * (L + 1) + L}.{2 if up_has_attn[int(m[1])] else 1}.", k)


def _vae_key(k, levels):
    """diffusers AutoencoderKL key -> LDM key. The decoder's up levels are numbered in reverse in LDM."""
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
    for a, b in {"mid_block.attentions.0.group_norm": "mid.attn_1.norm", "mid_block.attentions.0.to_q": "mid.attn_1.q",
                 "mid_block.attentions.0.to_k": "mid.attn_1.k", "mid_block.attentions.0.to_v": "mid.attn_1.v",
                 "mid_block.attentions.0.to_out.0": "mid.attn_1.proj_out", "conv_norm_out": "norm_out",
                 # diffusers < 0.14 folders name the attention projections like this
                 "mid_block.attentions.0.query": "mid.attn_1.q", "mid_block.attentions.0.key": "mid.attn_1.k",
                 "mid_block.attentions.0.value": "mid.attn_1.v", "mid_block.attentions.0.proj_attn": "mid.attn_1.proj_out",
                 "conv_shortcut": "nin_shortcut"}.items():
        k = k.replace(a, b)
    return k


def _read_component(folder, name, dtype):
    """The weights of one diffusers component (unet/, vae/, text_encoder/), preferring safetensors."""
    d = os.path.join(folder, name)
    for fname in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                  "diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if os.path.exists(os.path.join(d, fname)):
            return read_tensors(os.path.join(d, fname), dtype)[0]
    raise LoadError(f"{d}: no weights found (expected diffusion_pytorch_model.safetensors or model.safetensors); "
                    "is the diffusers folder complete?")


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: cannot read ({e.__class__.__name__}); is the diffusers folder complete?") from None


def _diffusers_configs(folder):
    """diffusers config.json files -> our three configs (generic, so any SD-shaped folder loads)."""
    u = _load_json(os.path.join(folder, "unet", "config.json"))
    v = _load_json(os.path.join(folder, "vae", "config.json"))
    t = _load_json(os.path.join(folder, "text_encoder", "config.json"))
    boc, heads = u["block_out_channels"], u.get("num_attention_heads") or u["attention_head_dim"]
    ucfg = unet_mod.UNetConfig(
        in_channels=u["in_channels"], out_channels=u["out_channels"], model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=u["layers_per_block"],
        attention_resolutions=tuple(2 ** i for i, b in enumerate(u["down_block_types"]) if "CrossAttn" in b),
        # diffusers' SD1 config says attention_head_dim=8 but means 8 heads; SD2 lists heads per level
        num_heads=heads if isinstance(heads, int) else -1,
        num_head_channels=-1 if isinstance(heads, int) else boc[0] // heads[0],
        context_dim=u["cross_attention_dim"], transformer_depth=u.get("transformer_layers_per_block", 1),
        use_linear_in_transformer=u.get("use_linear_projection", False), norm_groups=u.get("norm_num_groups", 32),
        upcast_attention=u.get("upcast_attention", False) or False)
    vboc = v["block_out_channels"]
    vcfg = vae_mod.VAEConfig(ch=vboc[0], ch_mult=tuple(c // vboc[0] for c in vboc), num_res_blocks=v["layers_per_block"],
                             z_channels=v["latent_channels"], embed_dim=v["latent_channels"],
                             scale_factor=v.get("scaling_factor", 0.18215), norm_groups=v.get("norm_num_groups", 32))
    version = "sd1" if t["hidden_act"] == "quick_gelu" else "sd2"  # OpenAI CLIP vs OpenCLIP
    tcfg = dataclasses.replace(clip_text.PRESETS[version], vocab_size=t["vocab_size"], width=t["hidden_size"],
                               layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                               context_length=t["max_position_embeddings"], output_layer=-1)
    return version, ucfg, vcfg, tcfg


def _load_diffusers(folder, dtype, prediction, objective):
    version, ucfg, vcfg, tcfg = _diffusers_configs(folder)
    L, up_attn = ucfg.num_res_blocks, [False] * len(ucfg.channel_mult)
    for i in range(len(up_attn)):  # up level i runs at downsampling factor 2**(levels-1-i)
        up_attn[i] = 2 ** (len(up_attn) - 1 - i) in ucfg.attention_resolutions
    unet_sd = {_unet_key(k, L, up_attn): v for k, v in _read_component(folder, "unet", dtype).items()}
    vae_sd = {_vae_key(k, len(vcfg.ch_mult)): (v[:, :, None, None] if v.ndim == 2 else v)
              for k, v in _read_component(folder, "vae", dtype).items()}
    # diffusers' SD2 text encoder already stops at the penultimate OpenCLIP block (23 layers), so its
    # last layer is the one SD uses: output_layer=-1 over those 23 blocks.
    text_sd = clip_text.from_hf_state_dict(_read_component(folder, "text_encoder", dtype), tcfg)
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    sched = _load_json(sched_path) if os.path.exists(sched_path) else {}
    abar = sd_alphas_cumprod(sched.get("num_train_timesteps", 1000), sched.get("beta_start", 0.00085),
                             sched.get("beta_end", 0.012))
    return SD(unet=_build(unet_mod.UNet, ucfg, unet_sd, "UNet", folder),
              vae=_build(vae_mod.AutoencoderKL, vcfg, vae_sd, "VAE", folder),
              text_encoder=_build(clip_text.TextEncoder, tcfg, text_sd, "text encoder", folder),
              tokenizer=clip_text.Tokenizer.from_folder(os.path.join(folder, "tokenizer")), version=version,
              prediction=prediction or ("v" if sched.get("prediction_type") == "v_prediction" else "eps"),
              alphas_cumprod=abar, objective=objective or "diffusion", name=os.path.basename(folder.rstrip("/")))


# ----------------------------------------------------------------------------- the Hugging Face cache

def hf_cache_dir():
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "hub")


def find_in_hf_cache(repo_id):
    """'org/name' -> the snapshot folder of a model already in the local cache (refs/main if present)."""
    repo = os.path.join(hf_cache_dir(), "models--" + repo_id.replace("/", "--"))
    snaps = os.path.join(repo, "snapshots")
    if not os.path.isdir(snaps) or not os.listdir(snaps):
        raise LoadError(f"{repo_id}: not a file or folder, and not in the Hugging Face cache ({hf_cache_dir()}); "
                        "download it first or pass a path (this code never downloads)")
    ref = os.path.join(repo, "refs", "main")
    if os.path.exists(ref):
        with open(ref) as f:
            return os.path.join(snaps, f.read().strip())
    return max((os.path.join(snaps, s) for s in os.listdir(snaps)), key=os.path.getmtime)


def _single_file_in(folder):
    files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".ckpt")))
    st = [f for f in files if f.endswith(".safetensors")] or files
    if len(st) != 1:
        raise LoadError(f"{folder}: {'no' if not st else len(st)} checkpoint files {st[:4]}; pass one file's path")
    return os.path.join(folder, st[0])


# ----------------------------------------------------------------------------- public API

def load(path, device="cpu", dtype=torch.float32, prediction=None, objective=None):
    """Load SD from a single file, a diffusers folder or a cached repo id -> SD bundle.

    prediction: force "eps" or "v" (original single files do not say; diffusers folders and our
    own checkpoints do). dtype: the weights' dtype; each tensor is cast as it is read.
    """
    if prediction not in (None, "eps", "v"):
        raise LoadError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith("."):
            path = find_in_hf_cache(path)
        else:
            raise LoadError(f"{path}: no such file or folder; pass a .safetensors/.ckpt file, a diffusers folder or a cached repo id")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "model_index.json")):
        path = _single_file_in(path)
    sd = _load_resolved(path, dtype, prediction, objective)
    if dtype == torch.float16 and sd.version == "sd2":  # SD2's attention logits overflow fp16 (black images)
        sd.unet.cfg.upcast_attention = True
        for m in sd.unet.modules():
            if hasattr(m, "upcast"):
                m.upcast = True
    for m in (sd.unet, sd.vae, sd.text_encoder):
        m.to(device)
    return sd


def _load_resolved(path, dtype, prediction, objective):
    if os.path.isdir(path):
        return _load_diffusers(path, dtype, prediction, objective)
    tensors, meta = read_tensors(path, dtype)
    if "lora_config" in meta:  # a LoRA file names its base; load that, then add the LoRA
        return _load_lora_file(path, tensors, meta, dtype, prediction, objective)
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
    ucfg = unet_mod.UNetConfig(**json.loads(meta["unet_config"]))
    sd.unet = _build(unet_mod.UNet, ucfg, _strip(tensors, PREFIX["unet"]), "UNet", path)
    sd.objective = objective or meta.get("objective", sd.objective)
    sd.prediction = prediction or meta.get("prediction", sd.prediction)
    return _named(sd, path, meta)


def _load_lora_file(path, tensors, meta, dtype, prediction, objective):
    """A LoRA .safetensors written by lora.save_lora: its metadata names the base checkpoint (a path,
    relative to the LoRA file, or a repo id) and what trained it. The LoRA is merged for speed."""
    import lora
    sd = _load_base(path, meta, dtype, prediction, objective)
    lora.load_lora(sd.unet, path)
    lora.merge_lora(sd.unet)
    return _named(sd, path, meta)


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


def save(sd, path, dtype=None, base=None, **extra):
    """Write the bundle as one original-layout .safetensors or .ckpt, atomically (temp file + rename).

    base: the checkpoint this one was fine-tuned from (a path relative to `path`, absolute, or a repo
    id). Then only the UNet is written and load() takes the VAE and text encoder from the base."""
    from safetensors.torch import save_file
    tensors = {k: (v.to(dtype) if dtype and v.is_floating_point() and k != "alphas_cumprod" else v).contiguous().cpu()
               for k, v in state_dict(sd).items() if not base or k.startswith(PREFIX["unet"])}
    if base:
        extra["base_model"] = base
    tmp = f"{path}.tmp{os.getpid()}"
    if path.endswith(".safetensors"):
        save_file(tensors, tmp, metadata=metadata(sd, **extra))
    else:
        torch.save({"state_dict": tensors, "d2f_meta": metadata(sd, **extra)}, tmp)
    os.replace(tmp, path)


def create(unet="tiny", vae="tiny", text="tiny", version="sd1", prediction="v", alphas_cumprod=None):
    """A freshly initialised bundle from preset names or configs (our tiny family starts here)."""
    pick = lambda presets, c: dataclasses.replace(presets[c] if isinstance(c, str) else c)  # a copy: never mutate PRESETS
    ucfg, vcfg, tcfg = pick(unet_mod.PRESETS, unet), pick(vae_mod.PRESETS, vae), pick(clip_text.PRESETS, text)
    return SD(unet=unet_mod.UNet(ucfg), vae=vae_mod.AutoencoderKL(vcfg), text_encoder=clip_text.TextEncoder(tcfg),
              tokenizer=clip_text.Tokenizer(pad_id=49407 if version == "sd1" else 0), version=version,
              prediction=prediction, alphas_cumprod=sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
