"""SentencePiece (`tokenizer.ggml.model = llama`) vocabularies: pieces and scores, no merges.

A BPE with byte fallback is trained on a small corpus and written to a GGUF file the way
llama.cpp stores a SentencePiece model (control tokens, 256 byte tokens, pieces scored by merge
order). The imported tokenizer cuts text into the same pieces as the trained one, and as
transformers' own GGUF reader, and decodes back to the text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from services.gguf.importer import import_gguf
from services.gguf.reader import open_gguf
from services.gguf.tokenizer import build_tokenizer
from tests.gguf.gguf_files import write

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there, the world says hello",
          "a tokenizer learns merges from text it reads", "sentencepiece keeps spaces as a visible symbol",
          "numbers like 12 and 345 stay numbers", "over and over the fox jumps the dog"] * 30
TEXTS = ["hello world", "the lazy fox jumps over the quick dog", "  two leading spaces", "tokens: a, b; c!",
         "unseen ü and € fall back to bytes", "the<s>dog</s> ends"]


def trained() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    return tok


def spm_gguf(tmp_path: Path, reference: Tokenizer) -> Path:
    model = json.loads(reference.to_str())["model"]
    made = [m if isinstance(m, str) else "".join(m) for m in model["merges"]]
    made = ["".join(m.split(" ")) if isinstance(m, str) and " " in m else m for m in made]
    alphabet = [t for t in sorted(model["vocab"], key=model["vocab"].get) if t not in made and t[0] != "<"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + made + alphabet
    # SentencePiece scores a piece by when BPE made it: earlier merges score higher.
    scores = [0.0] * 259 + [-float(i) for i in range(len(made))] + [-1e4 - i for i in range(len(alphabet))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(made) + len(alphabet))
    meta = {"llama.embedding_length": 64, "llama.block_count": 1, "llama.attention.head_count": 4,
            "llama.feed_forward_length": 128, "llama.context_length": 128,
            "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": True}
    return write(tmp_path / "spm.gguf", "llama", meta, [])


def test_sentencepiece_vocabulary_tokenizes_as_trained_and_as_transformers(tmp_path: Path) -> None:
    reference = trained()
    path = spm_gguf(tmp_path, reference)
    ours = build_tokenizer(open_gguf(path))
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        pieces = ours.encode(text, add_special_tokens=False).tokens
        expected = reference.encode(text, add_special_tokens=False).tokens
        if "<unk>" not in expected:  # the trained model has no byte pieces to fall back to
            assert pieces == expected, text
        assert ours.encode(text).ids == theirs.encode(text), text  # BOS first, as add_bos_token says
        if not text.startswith(" "):  # Metaspace adds no prefix to text that starts with a space; decoding strips one
            assert ours.decode(ours.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    assert sum("<unk>" not in reference.encode(t).tokens for t in TEXTS) >= 3
    assert "<0xE2>" in ours.encode("\u20ac").tokens  # € is not a piece: UTF-8 bytes


def test_sentencepiece_folder_loads_in_the_engine_tokenizer(tmp_path: Path) -> None:
    """No tensors are needed to check the tokenizer files: write them the way the importer does."""
    from services.engine.tokenizer import Tokenizer as EngineTokenizer
    from services.gguf.tokenizer import tokenizer_config

    gguf = open_gguf(spm_gguf(tmp_path, trained()))
    build_tokenizer(gguf).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(gguf, 128)))
    tok = EngineTokenizer(tmp_path)
    ids = tok.encode("hello world")
    assert ids[0] == 1 and tok.decode(ids) == "hello world"
    assert tok.eos_token_ids == {2}


def test_a_file_without_weights_is_refused_after_its_vocabulary_is_read(tmp_path: Path) -> None:
    from services.gguf.reader import GGUFImportError

    with pytest.raises(GGUFImportError, match="token_embd.weight"):
        import_gguf(spm_gguf(tmp_path, trained()), tmp_path / "out")
