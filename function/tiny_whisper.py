"""A tiny random-weight Whisper checkpoint, built locally, for the speech-to-text stage's tests and CPU runs.

No weights can be downloaded here, so the ASR stage is exercised against this instead of a real Whisper: a real
`WhisperConfig` / `WhisperForConditionalGeneration` with small dims, a real `WhisperFeatureExtractor` (80 mel bins,
16 kHz, 30 s windows), a `WhisperTokenizer` (byte-level BPE trained here on a small embedded corpus) carrying Whisper's
special tokens in Whisper's order, and a generation config with Whisper's fields (`lang_to_id`, `task_to_id`,
`no_timestamps_token_id`, ...). It loads exactly as a real checkpoint directory does:

    AutoProcessor / WhisperProcessor / AutoModelForSpeechSeq2Seq / pipeline("automatic-speech-recognition")
        .from_pretrained(dir)

Layout of the vocabulary, as in openai/whisper-large-v3 (the 100-language list transformers knows): the BPE tokens,
then `<|endoftext|>`, `<|startoftranscript|>`, one `<|xx|>` per language, `<|translate|>`, `<|transcribe|>`,
`<|startoflm|>`, `<|startofprev|>`, `<|nospeech|>`, `<|notimestamps|>` (special tokens), then the 1501 timestamp
tokens `<|0.00|>` .. `<|30.00|>` (added, not special). The tokenizer and `generate` both rely on that order: a
language id is `<|startoftranscript|>` + 1 + its index, timestamps start right after `<|notimestamps|>`.

`max_length` is 32 (the real checkpoints say 448): random weights rarely emit `<|endoftext|>`, and a test should not
decode 448 tokens of noise. Outputs are noise, but a pure function of the audio and the seed; the weights are drawn so
that the noise is readable text that changes with the audio (see `_build_into`).

Imports of torch / transformers / tokenizers happen inside the functions: importing this module is cheap.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic_dir import marker_matches, publish_dir, save_model_quietly

__all__ = ["build_tiny_whisper", "BUILDER_VERSION", "MARKER_FILE", "special_tokens", "TIMESTAMP_TOKENS"]

#: Bump whenever anything written by `build_tiny_whisper` changes; a cached checkpoint of another version is rebuilt.
BUILDER_VERSION = 1
#: Written last into a finished checkpoint; names the builder version and seed.
MARKER_FILE = "tiny_whisper.json"

TIMESTAMP_TOKENS = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]

_DIMS = dict(
    num_mel_bins=80,
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=128,
    decoder_layers=2,
    decoder_attention_heads=2,
    decoder_ffn_dim=128,
    max_source_positions=1500,   # fixed by the 30 s window: 3000 mel frames, halved by the second conv
    max_target_positions=448,
    activation_function="gelu",
    init_std=0.02,
    scale_embedding=False,
)
_WEIGHT_STD = 0.3
_BPE_VOCAB = 1000
_MAX_LENGTH = 32

_CORPUS = """\
open wechat and send a message to mom
打开微信，给妈妈发消息
search for coffee shops near me and open the first result
搜索附近的咖啡店并打开第一个结果
set an alarm for seven thirty tomorrow morning
设置明天早上七点半的闹钟
turn on wi-fi in settings. take a screenshot. go back to the home screen.
打开设置里的无线局域网。截个屏。回到桌面。
play the latest song by my favourite singer, then turn the volume up.
播放我最喜欢的歌手的最新歌曲，然后调大音量。
book a taxi to the airport at nine am and check the weather in beijing.
预约明早九点去机场的出租车，并查看北京的天气。
add milk, eggs and bread to the shopping cart. order a large latte on meituan.
把牛奶、鸡蛋和面包加入购物车。在美团上点一杯大杯拿铁。
what is on the screen? scroll down. tap the search box and type running shoes.
屏幕上有什么？向下滚动。点击搜索框并输入运动鞋。
"""


def special_tokens() -> list[str]:
    """Whisper's special tokens, in Whisper's id order (`<|endoftext|>` first, `<|notimestamps|>` last)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{code}|>" for code in LANGUAGES]
            + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
               "<|notimestamps|>"])


def _build_tokenizer():
    """A byte-level BPE trained on the corpus (GPT-2 pre-tokenisation, as Whisper's), wrapped as `WhisperTokenizer`
    with the special tokens, then the timestamp tokens, appended in Whisper's order."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=_BPE_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    bpe.train_from_iterator(lines * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    specials = special_tokens()
    tok = WhisperTokenizer(vocab=model["vocab"], merges=merges, model_max_length=448,
                           extra_special_tokens=specials[1:])
    tok.add_tokens([AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False)
                    for t in TIMESTAMP_TOKENS])
    ids = tok.convert_tokens_to_ids(specials)
    first = len(model["vocab"])
    if ids != list(range(first, first + len(specials))):       # the order generate() and decode() rely on
        raise RuntimeError("tiny Whisper tokenizer: special tokens are not contiguous after the BPE vocabulary")
    if tok.convert_tokens_to_ids(TIMESTAMP_TOKENS[0]) != ids[-1] + 1:
        raise RuntimeError("tiny Whisper tokenizer: timestamps do not follow <|notimestamps|>")
    return tok


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _build_into(d: Path, seed: int) -> None:
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor)

    tokenizer = _build_tokenizer()
    specials = special_tokens()
    ids = dict(zip(specials, tokenizer.convert_tokens_to_ids(specials)))
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    space = tokenizer.convert_tokens_to_ids("Ġ")       # Whisper suppresses a leading space (id 220 in the real one)
    vocab_size = len(tokenizer)
    # Noise made of readable text: BPE pieces that are not whole printable characters on their own (control bytes,
    # parts of a CJK character) are suppressed, as the real checkpoints suppress their list of non-speech symbols.
    suppress = [i for i in range(eot) if "\ufffd" in (t := tokenizer.decode([i])) or not t.isprintable()]
    config = WhisperConfig(vocab_size=vocab_size, decoder_start_token_id=sot, pad_token_id=eot, bos_token_id=eot,
                           eos_token_id=eot, begin_suppress_tokens=[space, eot], suppress_tokens=suppress,
                           architectures=["WhisperForConditionalGeneration"], **_DIMS)
    with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG; leave callers' state alone
        model = WhisperForConditionalGeneration(config).to(torch.float32).eval()
    # Redraw every matrix from a private generator in a fixed order: the weights depend on `seed` alone. The spread
    # is wider than transformers' init (0.02) so that the noise depends on the audio; norms stay 1, biases 0 and the
    # sinusoidal encoder positions are kept.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.dim() >= 2 and "encoder.embed_positions" not in name:
                param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, _WEIGHT_STD, generator=gen))
        # 1501 timestamp tokens would outnumber the text ones: zero their (tied) embeddings, so their logits stay
        # near 0 and the noise is mostly text (decode() drops timestamps); generate() still handles them
        model.model.decoder.embed_tokens.weight[ids["<|notimestamps|>"] + 1:] = 0.0
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    lang_to_id = {f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        begin_suppress_tokens=[space, eot],
        suppress_tokens=suppress,
        is_multilingual=True,
        lang_to_id=lang_to_id,
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50,
        max_length=_MAX_LENGTH,
        return_timestamps=False,
        alignment_heads=[[1, 0], [1, 1]],
    )
    save_model_quietly(model, d)  # config.json, generation_config.json, model.safetensors
    feature_extractor = WhisperFeatureExtractor(feature_size=_DIMS["num_mel_bins"], sampling_rate=16000,
                                                hop_length=160, chunk_length=30, n_fft=400)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(d)
    _write_json(d / MARKER_FILE, {
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "architecture": "WhisperForConditionalGeneration",
        "vocab_size": vocab_size,
        "note": "Tiny random-weight Whisper for tests; its transcripts are noise.",
    })
    os.chmod(d, 0o755)      # mkdtemp makes the directory 0700: readable like any other checkpoint
    for f in d.iterdir():
        os.chmod(f, 0o644)


def _complete(d: Path, seed: int) -> bool:
    return marker_matches(d, MARKER_FILE, builder_version=BUILDER_VERSION, seed=seed)


def build_tiny_whisper(out_dir: str | os.PathLike[str], seed: int = 0, *, force: bool = False) -> Path:
    """Build the tiny Whisper checkpoint into `out_dir` (once) and return its path.

    Idempotent and atomic as `tiny_model.build_tiny_model`: a finished checkpoint of this builder version and seed is
    returned as is; otherwise it is written into a temporary directory beside `out_dir` and renamed into place, so
    readers never see half a checkpoint and racing builders both end with a complete one. Weights are a pure
    function of `seed`.
    """
    return publish_dir(Path(out_dir), lambda tmp: _build_into(tmp, seed), lambda d: _complete(d, seed),
                       force=force, what="tiny Whisper model")
