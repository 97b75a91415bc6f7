"""The diffusers folder format and the Hugging Face cache, for sd.load.

A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) is read into
our three configs and state dicts keyed like the original single file's models; the keys are mapped
by a few rules (`_unet_key`, `_vae_key`), never a table. sd.py builds the models from what `read_folder`
returns and passes in its tensor reader, so this module sits below sd.py and never imports it.
Nothing here touches the network: a repo id is only looked up in the local cache.
"""
import dataclasses
import json
import os
import re
from dataclasses import dataclass

from safetensors import safe_open

import clip_text
import unet as unet_mod
import vae as vae_mod


class LoadError(RuntimeError):
    """A checkpoint could not be loaded; the message is one line saying what to do.
    (Defined here, below sd.py, so that both formats raise the one class sd.py exports.)"""


@dataclass
class Folder:
    """What a diffusers folder holds, in our terms."""
    version: str       # "sd1" | "sd2" (text encoder family)
    configs: tuple     # (UNetConfig, VAEConfig, TextConfig)
    weights: tuple     # their state dicts, with our (original LDM) key names
    tokenizer: clip_text.Tokenizer
    prediction: str    # "eps" | "v", from the scheduler config
    schedule: dict     # sd.sd_alphas_cumprod's arguments (T, beta_start, beta_end)


# ----------------------------------------------------------------------------- key rules

_UNET_PREFIXES = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
                  "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_key(k, L, up_has_attn):
    """diffusers UNet2DConditionModel key -> LDM key. L = layers_per_block (resnets per level)."""
    for a, b in _UNET_PREFIXES.items():
        if k.startswith(a):
            return b + k[len(a):]
    k = re.sub(r"resnets\.(\d+)\.(norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut)",
               lambda m: f"resnets.{m[1]}.{_RESNET_PARTS[m[2]]}", k)
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


_LDM_PREFIXES = {b: a for a, b in _UNET_PREFIXES.items()}
_RESNET_NAMES = {b: a for a, b in _RESNET_PARTS.items()}


def diffusers_unet_key(k, L, up_has_attn):
    """LDM key (our UNet's) -> diffusers UNet2DConditionModel key: the inverse of `_unet_key`."""
    for a, b in _LDM_PREFIXES.items():
        if k.startswith(a):
            return b + k[len(a):]

    def down(m):  # input block n >= 1: level n-1 // (L+1); the last of each level is the downsampler
        level, i = divmod(int(m[1]) - 1, L + 1)
        return (f"down_blocks.{level}.downsamplers.0.conv." if i == L else
                f"down_blocks.{level}.{'resnets' if m[2] == '0' else 'attentions'}.{i}.")

    def up(m):  # output block n: level n // (L+1), L+1 blocks each; the last one also holds the upsampler
        level, i = divmod(int(m[1]), L + 1)
        part = "resnets" if m[2] == "0" else "attentions" if m[2] == "1" and up_has_attn[level] else None
        return f"up_blocks.{level}.{part}.{i}." if part else f"up_blocks.{level}.upsamplers.0."
    k = re.sub(r"^input_blocks\.(\d+)\.(\d)\.(op\.)?", down, k)
    k = re.sub(r"^middle_block\.(\d)\.", lambda m: ("mid_block.resnets.0.", "mid_block.attentions.0.",
                                                     "mid_block.resnets.1.")[int(m[1])], k)
    k = re.sub(r"^output_blocks\.(\d+)\.(\d)\.", up, k)
    return re.sub(r"(resnets\.\d+\.)(in_layers\.[02]|emb_layers\.1|out_layers\.[03]|skip_connection)",
                  lambda m: m[1] + _RESNET_NAMES[m[2]], k)


def unet_key_rules(ucfg):
    """(layers per block, whether each up level has attention) of a UNetConfig: what the key rules need."""
    levels = len(ucfg.channel_mult)
    # up level i runs at 2**(levels-1-i)
    return ucfg.num_res_blocks, [2 ** (levels - 1 - i) in ucfg.attention_resolutions for i in range(levels)]


_VAE_NAMES = {"mid_block.attentions.0.group_norm": "mid.attn_1.norm", "mid_block.attentions.0.to_q": "mid.attn_1.q",
              "mid_block.attentions.0.to_k": "mid.attn_1.k", "mid_block.attentions.0.to_v": "mid.attn_1.v",
              "mid_block.attentions.0.to_out.0": "mid.attn_1.proj_out", "conv_norm_out": "norm_out",
              # diffusers < 0.14 folders name the attention projections like this
              "mid_block.attentions.0.query": "mid.attn_1.q", "mid_block.attentions.0.key": "mid.attn_1.k",
              "mid_block.attentions.0.value": "mid.attn_1.v", "mid_block.attentions.0.proj_attn": "mid.attn_1.proj_out",
              "conv_shortcut": "nin_shortcut"}


def _vae_key(k, levels):
    """diffusers AutoencoderKL key -> LDM key. The decoder's up levels are numbered in reverse in LDM."""
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
    for a, b in _VAE_NAMES.items():
        k = k.replace(a, b)
    return k


# ----------------------------------------------------------------------------- configs

def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: cannot read ({e.__class__.__name__}); is the diffusers folder complete?") from None


def _unet_config(u):
    boc, heads = u["block_out_channels"], u.get("num_attention_heads") or u["attention_head_dim"]
    return unet_mod.UNetConfig(
        in_channels=u["in_channels"], out_channels=u["out_channels"], model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=u["layers_per_block"],
        attention_resolutions=tuple(2 ** i for i, b in enumerate(u["down_block_types"]) if "CrossAttn" in b),
        # diffusers' SD1 config says attention_head_dim=8 but means 8 heads; SD2 lists heads per level
        num_heads=heads if isinstance(heads, int) else -1,
        num_head_channels=-1 if isinstance(heads, int) else boc[0] // heads[0],
        context_dim=u["cross_attention_dim"], transformer_depth=u.get("transformer_layers_per_block", 1),
        use_linear_in_transformer=u.get("use_linear_projection", False), norm_groups=u.get("norm_num_groups", 32),
        upcast_attention=u.get("upcast_attention", False) or False)


def _vae_config(v):
    boc = v["block_out_channels"]
    return vae_mod.VAEConfig(ch=boc[0], ch_mult=tuple(c // boc[0] for c in boc), num_res_blocks=v["layers_per_block"],
                             z_channels=v["latent_channels"], embed_dim=v["latent_channels"],
                             scale_factor=v.get("scaling_factor", 0.18215), norm_groups=v.get("norm_num_groups", 32))


def _text_config(t, version):
    return dataclasses.replace(clip_text.PRESETS[version], vocab_size=t["vocab_size"], width=t["hidden_size"],
                               layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                               context_length=t["max_position_embeddings"], output_layer=-1)


def _diffusers_configs(folder):
    """diffusers config.json files -> our three configs (generic, so any SD-shaped folder loads)."""
    u, v, t = (_load_json(os.path.join(folder, name, "config.json")) for name in ("unet", "vae", "text_encoder"))
    version = "sd1" if t["hidden_act"] == "quick_gelu" else "sd2"  # OpenAI CLIP vs OpenCLIP
    return version, _unet_config(u), _vae_config(v), _text_config(t, version)


# ----------------------------------------------------------------------------- weights

WEIGHTS = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)(?:\.(\w+))?\.(safetensors|bin)$")


def component_file(folder, name):
    """The weights file of one diffusers component (unet/, vae/, text_encoder/): safetensors before .bin, the
    plain file before a variant (`diffusion_pytorch_model.fp16.safetensors`, what `variant="fp16"` downloads),
    fp16 before other variants; a folder holding only variants loads (each tensor is cast as it is read)."""
    d = os.path.join(folder, name)
    found = [(m[3] != "safetensors", m[2] is not None, m[2] != "fp16", f)
             for f in (os.listdir(d) if os.path.isdir(d) else ()) if (m := WEIGHTS.match(f))]
    if not found:
        raise LoadError(f"{d}: no weights found (expected diffusion_pytorch_model[.fp16].safetensors or "
                        "model[.fp16].safetensors); is the diffusers folder complete?")
    return os.path.join(d, min(found)[3])


def _read_component(folder, name, read):
    return read(component_file(folder, name))


def _unet_weights(folder, ucfg, read):
    L, up_attn = unet_key_rules(ucfg)
    return {_unet_key(k, L, up_attn): v for k, v in _read_component(folder, "unet", read).items()}


def _vae_weights(folder, vcfg, read):
    # diffusers stores the VAE's 1x1 attention convs as linear weights
    return {_vae_key(k, len(vcfg.ch_mult)): (v[:, :, None, None] if v.ndim == 2 else v)
            for k, v in _read_component(folder, "vae", read).items()}


def _scheduler(folder):
    """(prediction, schedule arguments) from scheduler/scheduler_config.json (SD's defaults without it)."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    s = _load_json(path) if os.path.exists(path) else {}
    schedule = {"T": s.get("num_train_timesteps", 1000), "beta_start": s.get("beta_start", 0.00085),
                "beta_end": s.get("beta_end", 0.012)}
    return ("v" if s.get("prediction_type") == "v_prediction" else "eps"), schedule


def read_folder(folder, read):
    """A diffusers SD folder -> Folder. read(path) -> state dict reads one weights file (sd.py's reader)."""
    version, ucfg, vcfg, tcfg = _diffusers_configs(folder)
    # diffusers' SD2 text encoder already stops at the penultimate OpenCLIP block (23 layers), so its
    # last layer is the one SD uses: output_layer=-1 over those 23 blocks.
    text_sd = clip_text.from_hf_state_dict(_read_component(folder, "text_encoder", read), tcfg)
    prediction, schedule = _scheduler(folder)
    return Folder(version=version, configs=(ucfg, vcfg, tcfg),
                  weights=(_unet_weights(folder, ucfg, read), _vae_weights(folder, vcfg, read), text_sd),
                  tokenizer=clip_text.Tokenizer.from_folder(os.path.join(folder, "tokenizer")),
                  prediction=prediction, schedule=schedule)


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


# ----------------------------------------------------------------------------- a base UNet, partially read

def _subset(path, names):
    """{name: tensor} for `names` of a .safetensors file, read one by one (the rest of the file is not read)."""
    with safe_open(path, "pt") as f:
        missing = [n for n in names if n not in f.keys()]
        if missing:
            raise LoadError(f"{path}: no {missing[0]} in this base checkpoint; is it the LoRA's base?")
        return {n: f.get_tensor(n) for n in names}, f.metadata() or {}


def base_unet(path, keys):
    """(UNetConfig, {LDM key: tensor} for `keys`) of a base checkpoint (.safetensors single file, ours or the
    original, or a diffusers folder), reading only those tensors: what a LoRA export needs of its base."""
    if os.path.isdir(path):
        ucfg = _unet_config(_load_json(os.path.join(path, "unet", "config.json")))
        f = component_file(path, "unet")
        if not f.endswith(".safetensors"):
            raise LoadError(f"{f}: a .bin base; convert it to .safetensors first")
        names = {diffusers_unet_key(k, *unet_key_rules(ucfg)): k for k in keys}
        tensors, _ = _subset(f, list(names))
        return ucfg, {names[n]: v for n, v in tensors.items()}
    if not path.endswith(".safetensors"):
        raise LoadError(f"{path}: the base must be a .safetensors file or a diffusers folder to export from")
    tensors, meta = _subset(path, ["model.diffusion_model." + k for k in keys])
    # an original SD1/SD2 file: both UNets share sd15's block layout, all the key rules need
    ucfg = unet_mod.UNetConfig(**json.loads(meta["unet_config"])) if "unet_config" in meta else unet_mod.PRESETS["sd15"]
    return ucfg, {k.removeprefix("model.diffusion_model."): v for k, v in tensors.items()}
