"""clip_text.py vs transformers (tokenizer, SD1 encoder) and diffusers' SD2 checkpoint conversion."""
import dataclasses
import html
import json
import os
import random
import warnings

import ftfy
import pytest
import regex
import torch

from helpers import write_clip_vocab
from clip_text import (DEFAULT_BPE, PRESETS, TextEncoder, Tokenizer, from_hf_state_dict,
                       unused_keys)

# ----------------------------------------------------------------------------- tokenizer

HAND = [
    "", " ", "a photo of a cat", "A Photo Of A CAT", "  lots   of\tspaces\n\nand\r\nnewlines  ",
    "café crème brûlée, naïve façade", "Ünïcödé ÀÉÎÕÜ ß ø å æ œ",
    "emoji 😀🐱‍👤🚀 ❤️ 👍🏽 🇯🇵", "日本語のテキスト 中文 한국어",
    "Москва, Ελληνικά, עברית, العربية, हिन्दी",
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;x&#39; &amp;amp;lt;",
    "3.14159 1,000,000 2024-01-01 12:30pm 4k 8K 1080p", "!!!???...,,,;;;:::---___***###@@@$$$%%%^^^",
    "it's don't they're we've I'm you'll he'd IT'S DON'T", "rock'n'roll 'quoted' ''double'' '''triple'''",
    "curly “quotes” and ‘single’ — em dash – en dash … ellipsis",
    "ﬁ ligature ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "mojibake: cafÃ© SchÃ¶n", "<|endoftext|> inside <|startoftext|> text", "tab\tseparated\tvalues",
    "masterpiece, best quality, (ultra detailed:1.2), [[cinematic]], {soft light}, trending on artstation",
    "a_snake_case_word CamelCaseWord kebab-case-word http://example.com/a?b=c#d user@mail.org",
    "x" * 300, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["a very long prompt"] * 40), "ab" * 100, "🙂" * 90, "1 2 3 4 5 6 7 8 9 0 " * 10,
]


def generated(n=200, seed=0):
    """Random prompts mixing words, casing, punctuation, digits, entities, non-Latin chars and whitespace."""
    rng = random.Random(seed)
    pieces = ["cat", "Dog", "PHOTO", "landscape", "painting", "by", "greg", "rutkowski", "4k", "hdr", "it's",
              "can't", "&amp;", "&lt;", "&gt;", "&#x27;", "é", "ñ", "ü", "Æ", "😀", "🌸", "日本", "猫",
              "кот", "ß",
              "12", "3.5", "2023", ",", ".", "!", "?", "(", ")", "[", "]", ":", "--", "...", "'", '"', "/", "\\",
              "#", "%", "+", "=", "~", "|", "<", ">", "©", "°", "½", "µ"]
    seps = [" ", "  ", "\t", "\n", "", " , ", "   "]
    out = []
    for _ in range(n):
        words = [rng.choice(pieces) for _ in range(rng.randint(0, rng.choice([8, 30, 120])))]
        words = [w.upper() if rng.random() < 0.1 else w for w in words]
        out.append("".join(w + rng.choice(seps) for w in words))
    return out


# Where SD1's and SD2's tokenizers differ (issue 16): HTML entities (open_clip unescapes them, transformers' slow
# CLIPTokenizer leaves them to ftfy, which keeps them in text holding '<') and typed special-token text.
ENTITIES = ["tom & jerry <3 &amp; friends", "<b>bold</b> &amp; more", "fish &amp; chips", "&lt;3 &amp; &gt;",
            "<i>it</i> &quot;q&quot;", "a <|endoftext|> b", "<|startoftext|> literal", "x <start_of_text> y <end_of_text>",
            "tom &amp; jerry <|endoftext|> &amp; more", "A <|ENDOFTEXT|> b"]
PROMPTS = HAND + generated() + ENTITIES


def clip_basic_clean(text):
    """OpenAI CLIP's basic_clean. transformers 5's CLIPTokenizer is the `tokenizers` fast backend: it does
    NFC + whitespace + lowercase but neither ftfy nor html.unescape, so its input gets this first."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def slow_clip_clean(text):
    """What transformers' slow CLIPTokenizer (SD1's) fed its BPE, for the fast one: it split off the literal
    special tokens first (as the fast one does), then ran ftfy.fix_text on each chunk; no html.unescape."""
    chunks = regex.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text)
    return "".join(c if c in ("<|startoftext|>", "<|endoftext|>") else ftfy.fix_text(c) for c in chunks)


def typed_special(p):
    return "<|" in p or "_of_text>" in p


def open_clip_tokenizer():
    """open_clip's SimpleTokenizer (SD2's), its tokenizer.py loaded from file: the package needs torchvision."""
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("open_clip_tokenizer", path))
    module.__spec__.loader.exec_module(module)
    return module.SimpleTokenizer(bpe_path=DEFAULT_BPE)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_clip_vocab(tmp_path_factory.mktemp("clip_tokenizer"))


def hf_tokenizer(folder, pad_token):
    from transformers import CLIPTokenizer
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad_token)


def hf_ids(tok, prompts, clean=clip_basic_clean):
    cleaned = [clean(p) for p in prompts]
    return tok(cleaned, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_prompt_set_is_varied():
    tok = Tokenizer()
    assert len(PROMPTS) >= 200 and len(set(PROMPTS)) > 200
    assert sum(len(tok.encode(p)) > 75 for p in PROMPTS) >= 10, "need some over-long prompts"


def ours_ids(prompts, pad_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # over-long prompts warn; checked separately
        return Tokenizer(pad_id=pad_id)(prompts)


def mismatches(got, want, prompts):
    return [p for p, g, w in zip(prompts, got, want) if not torch.equal(g, w)]


def test_tokenizer_matches_slow_clip_tokenizer_sd1(hf_folder):
    """SD1 = transformers' slow CLIPTokenizer: the fast one behind slow_clip_clean, except where the two differ:
    special-token text in other case ('<|ENDOFTEXT|>'), which the slow one lowercased, matched with its pattern
    and took from its BPE cache as the special token, while the fast one BPE-encodes it."""
    prompts = [p for p in PROMPTS if p != "A <|ENDOFTEXT|> b"]
    got, want = ours_ids(prompts, 49407), hf_ids(hf_tokenizer(hf_folder, "<|endoftext|>"), prompts, slow_clip_clean)
    bad = mismatches(got, want, prompts)
    assert not bad, f"{len(bad)} prompts differ from SD1's CLIPTokenizer semantics, e.g. {bad[:3]!r}"
    assert (got[prompts.index("")] == torch.tensor([49406, 49407] + [49407] * 75)).all()
    ids = Tokenizer().encode
    assert ids("A <|ENDOFTEXT|> b") == ids("a <|endoftext|> b") == ids("a") + [49407] + ids("b")
    assert ids("tom &amp; jerry") == ids("tom & jerry") != ids("tom &amp; jerry <3")  # ftfy's rule for '<'


def test_tokenizer_matches_open_clip_sd2():
    """SD2 = open_clip's SimpleTokenizer: HTML unescaped twice; <start_of_text>/<end_of_text> are its special
    tokens, typed <|startoftext|> is plain text; zero padding."""
    got, want = ours_ids(PROMPTS, 0), open_clip_tokenizer()(PROMPTS)
    bad = mismatches(got, want, PROMPTS)
    assert not bad, f"{len(bad)} prompts differ from open_clip's SimpleTokenizer, e.g. {bad[:3]!r}"
    assert 49406 not in ours_ids("<|startoftext|> literal", 0)[0, 1:].tolist()


def test_tokenizer_matches_hf_sd2_padding(hf_folder):
    hf = hf_tokenizer(hf_folder, "!")
    # (typed special-token text aside: the SD2 test above covers it with open_clip itself)
    plain = [p for p in PROMPTS if "!" not in clip_basic_clean(p) and not typed_special(p)]
    assert len(plain) >= 150
    bad = mismatches(ours_ids(plain, 0), hf_ids(hf, plain), plain)
    assert not bad, f"{len(bad)} prompts differ from HF CLIPTokenizer(pad_token='!'), e.g. {bad[:3]!r}"
    # With pad_token="!", HF also turns every "!" typed in a prompt into the special pad token (diffusers
    # issue #4153). Original SD2 used open_clip.tokenize: "!" is BPE-encoded like any symbol, and only the
    # padding is 0. So for those prompts the reference is the SD1-padded ids with the padding zeroed.
    bang = [p for p in PROMPTS if p not in plain and not typed_special(p)]
    want = hf_ids(hf_tokenizer(hf_folder, "<|endoftext|>"), bang)
    want[torch.arange(77) > (want == 49407).int().argmax(1, keepdim=True)] = 0
    bad = mismatches(ours_ids(bang, 0), want, bang)
    assert len(bang) >= 20 and not bad, f"{len(bad)} prompts with '!' differ from open_clip semantics, e.g. {bad[:3]!r}"
    # open_clip.tokenize("! !! !!!") as quoted in diffusers#4153
    assert ours_ids("! !! !!!", 0)[0, :6].tolist() == [49406, 256, 748, 995, 49407, 0]


def test_from_files_matches_gz(hf_folder):
    a, b = Tokenizer(), Tokenizer.from_files(hf_folder / "vocab.json", hf_folder / "merges.txt")
    assert a.encoder == b.encoder and a.ranks == b.ranks
    assert all(a.encode(p) == b.encode(p) for p in PROMPTS)


@pytest.mark.parametrize("pad_entry,pad_id", [("<|endoftext|>", 49407), ("!", 0),
                                              ({"content": "!", "lstrip": False, "normalized": True}, 0)])
def test_from_folder_pad_token(hf_folder, tmp_path, pad_entry, pad_id):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((hf_folder / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_entry}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    tok = Tokenizer.from_folder(str(tmp_path))
    assert tok.pad_id == pad_id
    from transformers import CLIPTokenizer  # HF reads the same folder to the same ids ("!" aside, see above)
    # (typed special-token text aside: the SD2 test above covers it with open_clip itself)
    plain = [p for p in PROMPTS if "!" not in clip_basic_clean(p) and not typed_special(p)][:30]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = tok(plain)
    assert torch.equal(got, hf_ids(CLIPTokenizer.from_pretrained(str(tmp_path)), plain))


def test_overlong_prompt_warns_once_and_ends_with_eot():
    tok = Tokenizer()
    prompt = " ".join(["word"] * 100)  # 100 content tokens -> 25 dropped
    with pytest.warns(UserWarning, match="dropped 25 of 100") as rec:
        ids = tok(prompt)
    assert len(rec) == 1
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert (ids[0, 1:-1] == tok.encode("word")[0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 content tokens fit without a warning
        assert tok(" ".join(["word"] * 75))[0, -1] == 49407

# ----------------------------------------------------------------------------- encoders


def randomize_(model, seed=0):
    """Seeded non-trivial weights, norms included (so swapped keys would show), ~unit-scale activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or "ln_" in name):
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise * (0.5 if "embedding" in name else p.shape[-1] ** -0.5))
    return model


def build(cfg, seed=0):
    with torch.device("meta"):
        model = TextEncoder(cfg)
    return randomize_(model.to_empty(device="cpu"), seed).eval()


def hf_text_model(width, layers, heads, act, **kw):
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         hidden_act=act, layer_norm_eps=1e-5, **kw)
    return CLIPTextModel(cfg).eval()


def strip_text_model(sd):
    """transformers >= 5.6 CLIPTextModel has no `text_model.` wrapper; SD1 checkpoints (and we) do."""
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


IDS = Tokenizer()(["a photo of an astronaut riding a horse on mars", "ein Foto, 日本 &amp; 😀 " * 3])


def max_abs_diff(ours, hf):
    with torch.no_grad():
        a, b = ours(IDS), hf(input_ids=IDS).last_hidden_state
    assert torch.isfinite(a).all() and a[0].std(0).mean() > 0.1, "degenerate outputs would make parity vacuous"
    return (a - b).abs().max().item()


@pytest.mark.slow
def test_sd1_matches_transformers():
    torch.set_num_threads(2)
    ours = build(PRESETS["sd1"])
    sd = ours.state_dict()
    assert all(k.startswith("text_model.") for k in sd)
    hf = hf_text_model(768, 12, 12, "quick_gelu")
    assert set(strip_text_model(sd)) == set(hf.state_dict()), "SD1 keys must be HF CLIPTextModel's"
    hf.load_state_dict(strip_text_model(sd), strict=True)
    err = max_abs_diff(ours, hf)
    print(f"SD1 max abs diff {err:.2e}")
    assert err <= 1e-4, f"SD1 vs transformers CLIPTextModel: max abs {err:.2e} > 1e-4"
    # diffusers SD1 text_encoder/ folder (older saves also carry position_ids) -> our keys unchanged
    folder = {"text_model." + k: v for k, v in hf.state_dict().items()}
    folder["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert from_hf_state_dict(folder, PRESETS["sd1"]).keys() == sd.keys()


@pytest.mark.slow
def test_sd2_matches_diffusers_conversion():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    torch.set_num_threads(2)
    cfg = PRESETS["sd2"]
    ours = build(cfg)
    assert len(ours.transformer.resblocks) == 23
    g = torch.Generator().manual_seed(1)
    # Original SD2 checkpoint = our 23 blocks + block 23 + text_projection + logit_scale, under its prefix.
    block23 = {"transformer.resblocks.23." + k: torch.randn(v.shape, generator=g)
               for k, v in ours.transformer.resblocks[0].state_dict().items()}
    original = {**ours.state_dict(), **block23,
                "text_projection": torch.randn(1024, 1024, generator=g), "logit_scale": torch.tensor(4.6052)}
    assert sorted(unused_keys(cfg, original)) == sorted([*block23, "logit_scale", "text_projection"])
    kept = {k: v for k, v in original.items() if k not in set(unused_keys(cfg, original))}
    with torch.device("meta"):  # the loader's path: drop unused keys, then load strictly
        TextEncoder(cfg).load_state_dict(kept, strict=True, assign=True)
    checkpoint = {"cond_stage_model.model." + k: v for k, v in original.items()}
    del original, kept

    with torch.device("meta"):  # diffusers' SD2 text_encoder config; convert only reads .config
        hf = hf_text_model(1024, 23, 16, "gelu", projection_dim=512)
    converted = strip_text_model(convert_open_clip_checkpoint(hf, checkpoint))
    del checkpoint
    hf = hf_text_model(1024, 23, 16, "gelu", projection_dim=512)
    hf.load_state_dict(converted, strict=True)
    err = max_abs_diff(ours, hf)
    print(f"SD2 max abs diff {err:.2e}")
    assert err <= 1e-4, f"SD2 vs diffusers-converted CLIPTextModel: max abs {err:.2e} > 1e-4"

    # diffusers text_encoder/ folder weights (HF names) -> our layout, exactly our tensors back.
    back = from_hf_state_dict(hf.state_dict(), cfg)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_tiny_openclip_from_hf_state_dict():
    """HF (diffusers text_encoder/) weights -> OpenCLIP layout via from_hf_state_dict, on a tiny config."""
    cfg = dataclasses.replace(PRESETS["tiny"], layout="openclip", act="gelu", layers=4, output_layer=-2)
    hf = randomize_(hf_text_model(cfg.width, cfg.blocks, cfg.heads, "gelu"))
    ours = TextEncoder(cfg).eval()
    folder = {"text_model." + k: v for k, v in hf.state_dict().items()}  # names as on the hub
    ours.load_state_dict(from_hf_state_dict(folder, cfg), strict=True)
    assert len(ours.transformer.resblocks) == 3
    err = max_abs_diff(ours, hf)
    assert err <= 1e-5, f"tiny openclip vs transformers: max abs {err:.2e} > 1e-5"
    prefixless = from_hf_state_dict(hf.state_dict(), cfg)  # transformers >= 5.6 names
    assert all(torch.equal(prefixless[k], v) for k, v in ours.state_dict().items())


def test_tiny_openai_matches_transformers():
    ours = build(PRESETS["tiny"])
    hf = hf_text_model(128, 3, 4, "quick_gelu")
    hf.load_state_dict(strip_text_model(ours.state_dict()), strict=True)
    err = max_abs_diff(ours, hf)
    assert err <= 1e-5, f"tiny openai vs transformers: max abs {err:.2e} > 1e-5"


@pytest.mark.parametrize("layout", ["openai", "openclip"])
def test_tiny_shape_and_causality(layout):
    cfg = dataclasses.replace(PRESETS["tiny"], layout=layout)
    model = build(cfg)
    ids = Tokenizer()(["a red cube on a blue sphere", "two dogs"])
    changed = ids.clone()
    changed[:, 5] = 1234  # a later token must not affect earlier positions
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 77, 128)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) and not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-2)


def test_meta_construction_and_config_roundtrip():
    for name, cfg in PRESETS.items():
        assert dataclasses.replace(cfg) == type(cfg)(**json.loads(json.dumps(dataclasses.asdict(cfg))))
        with torch.device("meta"):
            model = TextEncoder(cfg)
        assert all(p.is_meta for p in model.parameters())
        assert not any(b.dtype == torch.long for b in model.buffers()), "no position_ids buffer"
    keys = [*TextEncoder(PRESETS["tiny"]).state_dict(), "text_model.embeddings.position_ids"]
    assert unused_keys(PRESETS["tiny"], keys) == ["text_model.embeddings.position_ids"]
