"""CLIP tokenizer and the two CLIP text encoders Stable Diffusion conditions on.

SD1 uses OpenAI CLIP ViT-L/14's text tower, SD2 uses OpenCLIP ViT-H/14's. Both are the same pre-LN
causal transformer; they differ in activation, in which block's output SD reads, in how the
tokenizer pads, and in parameter names. Each layout mirrors its original checkpoint, so weights
load with load_state_dict(strict=True) once the prefix is stripped:
  SD1 ("openai"):   strip `cond_stage_model.transformer.`  (HF CLIPTextModel names, text_model.*)
  SD2 ("openclip"): strip `cond_stage_model.model.`        (OpenCLIP names)

Checkpoint keys the modules intentionally have no slot for (`unused_keys(cfg, keys)` lists them,
the loader drops exactly those and then loads strictly):
  - SD2: `transformer.resblocks.23.*` (SD reads the penultimate block, so block 23 is never run;
    we build only 23 blocks, as diffusers' SD2 text_encoder does), `text_projection` and
    `logit_scale` (used only for CLIP's contrastive pooled embedding, never by SD).
  - SD1: `text_model.embeddings.position_ids` (an int arange buffer some checkpoints carry).
  - Generally: blocks at or after `cfg.blocks` when `output_layer` selects an earlier block.
Diffusers `text_encoder/` folders hold HF CLIPTextModel weights: for SD1 they are our keys as-is,
for SD2 `from_hf_state_dict` renames them and fuses q/k/v into OpenCLIP's in_proj.
"""
import dataclasses
import functools
import gzip
import html
import json
import os
import warnings

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- tokenizer

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
DEFAULT_BPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")
# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, symbol runs. The
# special tokens' text differs: SD1's tokenizer (transformers' CLIPTokenizer) spells them <|startoftext|> and
# <|endoftext|>, SD2's (open_clip's SimpleTokenizer) <start_of_text> and <end_of_text>; typed in a prompt, the
# other spelling is plain characters.
SPECIALS = {"clip": (SOT, EOT), "open_clip": ("<start_of_text>", "<end_of_text>")}
REST = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
PATS = {style: regex.compile("|".join(map(regex.escape, sp)) + "|" + REST, regex.IGNORECASE)
        for style, sp in SPECIALS.items()}
PAT = PATS["clip"]


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode char so BPE never sees whitespace/control chars."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # the 68 non-printable bytes are shifted to 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def clean(text: str) -> str:
    """open_clip's (SD2's) normalisation: ftfy, unescape HTML twice, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def clean_sd1(text: str) -> str:
    """transformers' slow CLIPTokenizer's (SD1's) normalisation: ftfy, whitespace runs -> one space, lowercase.
    No HTML unescaping of its own (ftfy unescapes entities only in text without '<')."""
    return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


def pieces(text: str, style: str) -> list[str]:
    """Text -> pre-tokenized pieces, as each SD tokenizer does it. SD1 (transformers' slow CLIPTokenizer) first
    splits off the literal special tokens, case-sensitively, then cleans each chunk; SD2 (open_clip) cleans the
    whole text, then finds its special tokens by the pattern."""
    if style == "open_clip":
        return PATS[style].findall(clean(text))
    out = []
    for chunk in regex.split(f"({regex.escape(SOT)}|{regex.escape(EOT)})", text):
        out += [chunk] if chunk in (SOT, EOT) else PATS[style].findall(clean_sd1(chunk))
    return out


def read_bpe(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build CLIP's vocab from the merges file: bytes, bytes+</w>, one token per merge, 2 specials (49408)."""
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]  # line 0 is a header
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(vocab)}, merges


class Tokenizer:
    """prompts -> (B, context_length) ids: [SOT] + tokens + [EOT] + padding.

    The pad id matters even though it is "just padding": the UNet cross-attends to all 77 positions.
    SD1 was trained with HF's CLIPTokenizer, which pads with EOT (49407); SD2 with open_clip.tokenize,
    which pads with zeros (id 0 happens to be "!").
    """

    def __init__(self, bpe_path=None, pad_id=49407, context_length=77, *, vocab=None, merges=None, style=None):
        if vocab is None:
            vocab, merges = read_bpe(bpe_path or DEFAULT_BPE)
        # SD2 (open_clip) pads with 0, SD1 (transformers) with EOT: the padding says whose text rules apply
        self.style = style or ("open_clip" if pad_id == 0 else "clip")
        self.encoder, self.ranks = vocab, {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.sot, self.eot = vocab[SOT], vocab[EOT]
        self.special = dict(zip(SPECIALS[self.style], (self.sot, self.eot)))  # its spelling -> id
        self.pad_id, self.context_length = pad_id, context_length
        self.bpe = functools.lru_cache(maxsize=65536)(self._bpe)  # per instance: prompts repeat words a lot

    @classmethod
    def from_files(cls, vocab_json, merges_txt, pad_id=49407, context_length=77, style=None):
        """Read an HF/diffusers vocab.json + merges.txt pair (merges.txt starts with a `#version` header)."""
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_txt, encoding="utf-8") as f:
            lines = f.read().split("\n")
        start = 1 if lines[0].startswith("#version") else 0
        merges = [tuple(line.split()) for line in lines[start:] if line]
        return cls(pad_id=pad_id, context_length=context_length, vocab=vocab, merges=merges, style=style)

    @classmethod
    def from_folder(cls, path):
        """Read a diffusers `tokenizer/` folder; its pad token is "<|endoftext|>" for SD1 and "!" for SD2."""
        pad = None
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if pad is None and os.path.exists(os.path.join(path, name)):
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    pad = json.load(f).get("pad_token")
        pad = pad["content"] if isinstance(pad, dict) else (pad or EOT)
        style = "clip" if pad == EOT else "open_clip"  # SD2's folders pad with "!"
        if os.path.exists(os.path.join(path, "vocab.json")):
            tok = cls.from_files(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), style=style)
        elif os.path.exists(os.path.join(path, "tokenizer.json")):  # what transformers >= 5 writes
            with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
                model = json.load(f)["model"]
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            tok = cls(vocab=model["vocab"], merges=merges, style=style)
        else:
            raise FileNotFoundError(f"{path}: no vocab.json + merges.txt or tokenizer.json; is the tokenizer folder complete?")
        tok.pad_id = tok.encoder[pad]
        return tok

    def _bpe(self, token: str) -> tuple[str, ...]:
        """Greedily apply the lowest-rank merge until none applies; the last symbol carries </w>."""
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every non-overlapping occurrence, left to right
                if word[i:i + 2] == pair:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids, without SOT/EOT."""
        ids = []
        for piece in pieces(text, self.style):
            if piece.lower() in self.special:  # the pattern matched it case-insensitively
                ids.append(self.special[piece.lower()])
                continue
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece))
        return ids

    def __call__(self, prompts) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        out = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids, room = self.encode(prompt), self.context_length - 2
            if len(ids) > room:  # both SD tokenizers keep the first 75 tokens and still end with EOT
                warnings.warn(f"prompt truncated to CLIP's {self.context_length}-token context: "
                              f"dropped {len(ids) - room} of {len(ids)} tokens", stacklevel=2)
                ids = ids[:room]
            out[i, :len(ids) + 2] = torch.tensor([self.sot] + ids + [self.eot])
        return out

# ----------------------------------------------------------------------------- text encoders


@dataclasses.dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12            # blocks in the original model (MLP hidden is always 4 * width)
    heads: int = 12
    act: str = "quick_gelu"     # OpenAI CLIP was trained with x*sigmoid(1.702x); OpenCLIP with exact GELU
    layout: str = "openai"      # parameter names: "openai" (HF CLIPTextModel) | "openclip"
    output_layer: int = -1      # block whose output (then final LN) SD uses: -1 last, -2 penultimate

    @property
    def blocks(self) -> int:    # blocks we build; later ones never influence SD's context
        return self.layers + self.output_layer + 1


PRESETS: dict[str, TextConfig] = {
    "sd1": TextConfig(),  # OpenAI CLIP ViT-L/14
    # OpenCLIP ViT-H/14. SD2 was trained on the penultimate block's output (ldm FrozenOpenCLIPEmbedder
    # layer="penultimate"): the last block is specialised for the pooled contrastive embedding.
    "sd2": TextConfig(width=1024, layers=24, heads=16, act="gelu", layout="openclip", output_layer=-2),
    "tiny": TextConfig(width=128, layers=3, heads=4),
}


def activation(name: str):
    return {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}[name]


def causal_attention(q, k, v, heads: int):
    """(B, T, C) q/k/v -> (B, T, C); each position attends only to itself and earlier tokens."""
    B, T, C = q.shape
    q, k, v = (t.view(B, T, heads, C // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, C/heads)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)


class OpenAIAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x):
        return self.out_proj(causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class OpenAIMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.width, 4 * cfg.width), nn.Linear(4 * cfg.width, cfg.width)
        self.act = activation(cfg.act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class OpenAIBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn, self.layer_norm1 = OpenAIAttention(cfg), nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp, self.layer_norm2 = OpenAIMLP(cfg), nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class OpenAITextEncoder(nn.Module):
    """SD1 layout: text_model.{embeddings, encoder.layers, final_layer_norm} as in HF CLIPTextModel."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = tm = nn.Module()
        tm.embeddings = nn.Module()
        tm.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        tm.embeddings.position_embedding = nn.Embedding(cfg.context_length, cfg.width)
        tm.encoder = nn.Module()
        tm.encoder.layers = nn.ModuleList(OpenAIBlock(cfg) for _ in range(cfg.blocks))
        tm.final_layer_norm = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, ids):
        """(B, T) token ids -> (B, T, width) context for the UNet's cross-attention."""
        tm = self.text_model
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding.weight[: ids.shape[1]]
        for layer in tm.encoder.layers:
            x = layer(x)
        return tm.final_layer_norm(x)


class OpenCLIPAttention(nn.Module):
    """nn.MultiheadAttention's parameter names (q/k/v fused in in_proj), computed with causal SDPA."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * cfg.width, cfg.width) * cfg.width ** -0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # (B, T, 3C) -> 3x (B, T, C)
        return self.out_proj(causal_attention(q, k, v, self.heads))


class OpenCLIPBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.width, eps=1e-5), OpenCLIPAttention(cfg)
        self.ln_2, self.act = nn.LayerNorm(cfg.width, eps=1e-5), activation(cfg.act)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(cfg.width, 4 * cfg.width), nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_2(x))))


class OpenCLIPTextEncoder(nn.Module):
    """SD2 layout: token_embedding, positional_embedding, transformer.resblocks, ln_final."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(OpenCLIPBlock(cfg) for _ in range(cfg.blocks))
        self.ln_final = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, ids):
        """(B, T) token ids -> (B, T, width); ln_final is applied to the selected block's output, as in SD2."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_final(x)


def TextEncoder(cfg: TextConfig) -> nn.Module:
    """Build the encoder whose parameter names match cfg.layout's original checkpoint."""
    return {"openai": OpenAITextEncoder, "openclip": OpenCLIPTextEncoder}[cfg.layout](cfg)

# ----------------------------------------------------------------------------- checkpoint helpers


def unused_keys(cfg: TextConfig, keys) -> list[str]:
    """Keys of a prefix-stripped original checkpoint that the encoder has no slot for (see module doc)."""
    block = "text_model.encoder.layers." if cfg.layout == "openai" else "transformer.resblocks."
    extra = {"text_model.embeddings.position_ids"} if cfg.layout == "openai" else {"text_projection", "logit_scale"}
    return [k for k in keys if k in extra or (k.startswith(block) and int(k[len(block):].split(".")[0]) >= cfg.blocks)]


# HF CLIPTextModel name -> OpenCLIP name, applied as substring renames (q/k/v are fused separately).
HF_TO_OPENCLIP = [("text_model.", ""), ("embeddings.token_embedding.", "token_embedding."),
                  ("embeddings.position_embedding.weight", "positional_embedding"), ("final_layer_norm.", "ln_final."),
                  ("encoder.layers.", "transformer.resblocks."), ("self_attn.", "attn."), ("layer_norm1.", "ln_1."),
                  ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]


def from_hf_state_dict(sd: dict, cfg: TextConfig) -> dict:
    """HF CLIPTextModel weights (a diffusers text_encoder/ folder) -> this module's state dict.

    Accepts keys with or without the `text_model.` prefix (transformers >= 5.6 dropped it). Unused keys
    (position_ids, surplus layers) are removed, so the result loads strictly.
    """
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    drop = set(unused_keys(dataclasses.replace(cfg, layout="openai"), sd))  # HF names follow the openai layout
    sd = {k: v for k, v in sd.items() if k not in drop}
    if cfg.layout == "openai":
        return sd
    out = {}
    for k, v in sd.items():
        for old, new in HF_TO_OPENCLIP:
            k = k.replace(old, new)
        out[k] = v
    for name in [k[: -len("q_proj.weight")] for k in out if k.endswith("q_proj.weight")]:
        for p in ("weight", "bias"):  # stack q, k, v along the output dim: (3C, C) / (3C,)
            out[f"{name}in_proj_{p}"] = torch.cat([out.pop(f"{name}{x}_proj.{p}") for x in "qkv"])
    return out
