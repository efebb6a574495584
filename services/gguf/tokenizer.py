"""GGUF's `tokenizer.ggml.*` metadata -> `tokenizer.json` and `tokenizer_config.json`.

Two kinds of vocabulary are in llama-family files. `gpt2`: a byte-level BPE (SmolLM, Qwen2,
Llama 3) with its merges and a pre-tokenizer named by `tokenizer.ggml.pre`, which says how text is
split before merging; each name maps to the split llama.cpp uses for it. `llama`: a SentencePiece
BPE (Llama 2, Mistral) stored as pieces with scores and no merges; the merges are rebuilt from the
scores (a merge ranks as high as the piece it makes), with byte fallback for what the pieces miss.
Control tokens become special tokens, so `<|im_end|>` in a chat template stays one token.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from services.gguf.reader import GGUFFile, GGUFImportError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (split regex or "gpt2" / "gpt2-digits", ignore_merges), as llama.cpp reads them.
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    **{name: ("gpt2", False) for name in ("gpt2", "gpt-2", "mpt", "olmo", "jais")},
    **{name: ("gpt2-digits", False) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell")},
    **{name: (_LLAMA3, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")},
    **{name: (_LLAMA3, False) for name in ("smaug-bpe", "dbrx")},
    **{name: (_QWEN2, False) for name in ("qwen2", "deepseek-r1-qwen")},
    "tekken": (_TEKKEN, True),
}


def build_tokenizer(gguf: GGUFFile) -> Tokenizer:
    kind = gguf.get("tokenizer.ggml.model")
    tokens: list[str] = gguf.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise GGUFImportError(f"{gguf.path}: no vocabulary (metadata 'tokenizer.ggml.tokens' is missing)")
    types: list[int] = gguf.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level(gguf, tokens)
    elif kind == "llama":
        tok = _sentencepiece(gguf, tokens, types)
    else:
        raise GGUFImportError(f"{gguf.path}: tokenizer {kind!r} is not supported (gpt2 byte-level BPE and llama "
                              "SentencePiece are)")
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=False) if k == CONTROL]
    tok.add_special_tokens(control)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types, strict=False) if k == USER_DEFINED])
    tok.post_processor = _post_processor(gguf, tokens, kind == "gpt2")
    return tok


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated piece keeps its first id, as llama.cpp looks it up
    return vocab


def _byte_level(gguf: GGUFFile, tokens: list[str]) -> Tokenizer:
    pre = gguf.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise GGUFImportError(f"{gguf.path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                              f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    split, ignore_merges = PRE_TOKENIZERS[pre]
    merges = []
    for m in gguf.get("tokenizer.ggml.merges") or []:
        left, sep, right = m.partition(" ")
        if not sep:
            raise GGUFImportError(f"{gguf.path}: merge {m!r} is not two pieces separated by a space")
        merges.append((left, right))
    try:
        tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=merges, ignore_merges=ignore_merges))
    except Exception as e:  # tokenizers raises its own exception type for a merge of unknown pieces
        raise GGUFImportError(f"{gguf.path}: the vocabulary and merges do not fit together ({e})") from None
    if split == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "gpt2-digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if split == _QWEN2:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a piece, best piece first.

    SentencePiece's BPE merges the adjacent pair whose result scores highest; ranking each pair by
    its result's score makes the BPE model do the same. Ties: longer left piece first, then ids.
    """
    vocab = _vocab(tokens)
    mergeable = {t for t, k in zip(tokens, types, strict=False) if k in (NORMAL, USER_DEFINED)}
    found = []
    for piece, score in zip(tokens, scores, strict=False):
        if piece not in mergeable:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                found.append((-score, -len(left), -len(right), vocab[left], vocab[right], left, right))
    found.sort()
    return [(f[5], f[6]) for f in found]


def _sentencepiece(gguf: GGUFFile, tokens: list[str], types: list[int]) -> Tokenizer:
    scores = gguf.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise GGUFImportError(f"{gguf.path}: a SentencePiece vocabulary needs one score per token "
                              "(metadata 'tokenizer.ggml.scores')")
    unk = _token_id(gguf, "unknown", tokens) or 0
    model = models.BPE(vocab=_vocab(tokens), merges=sentencepiece_merges(tokens, scores, types),
                       unk_token=tokens[unk], fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    add_prefix = bool(gguf.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if add_prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if add_prefix else []))
    return tok


def _token_id(gguf: GGUFFile, kind: str, tokens: list[str]) -> int | None:
    token_id = gguf.get(f"tokenizer.ggml.{kind}_token_id")
    if token_id is not None and not 0 <= token_id < len(tokens):
        raise GGUFImportError(f"{gguf.path}: tokenizer.ggml.{kind}_token_id {token_id} is not in the vocabulary "
                              f"of {len(tokens)} tokens")
    return token_id


def add_bos_eos(gguf: GGUFFile) -> tuple[bool, bool]:
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
    default_bos = gguf.get("tokenizer.ggml.model") == "llama"
    return (bool(gguf.get("tokenizer.ggml.add_bos_token", default_bos)),
            bool(gguf.get("tokenizer.ggml.add_eos_token", False)))


def _post_processor(gguf: GGUFFile, tokens: list[str], byte_level: bool) -> Any:
    add_bos, add_eos = add_bos_eos(gguf)
    bos_id, eos_id = _token_id(gguf, "bos", tokens), _token_id(gguf, "eos", tokens)
    first = [(tokens[bos_id], bos_id)] if add_bos and bos_id is not None else []
    last = [(tokens[eos_id], eos_id)] if add_eos and eos_id is not None else []
    if not first and not last:
        return processors.ByteLevel(trim_offsets=False) if byte_level else None
    head = f"{first[0][0]} " if first else ""
    tail = f" {last[0][0]}" if last else ""
    return processors.TemplateProcessing(single=f"{head}$A{tail}", pair=f"{head}$A{tail} {head}$B:1{tail}",
                                         special_tokens=list(dict.fromkeys(first + last)))


def tokenizer_config(gguf: GGUFFile, max_length: int) -> dict[str, Any]:
    tokens: list[str] = gguf.get("tokenizer.ggml.tokens")
    add_bos, add_eos = add_bos_eos(gguf)
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = _token_id(gguf, key, tokens)
        if token_id is not None:
            cfg[name] = tokens[token_id]
    cfg.update(add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False,
               model_max_length=max_length)
    template = gguf.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg
