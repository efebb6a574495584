"""What the gateway needs from a tokenizer; the real one comes from the engine's checkpoint loader."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class TextCodec(Protocol):
    eos_token_ids: set[int]
    vocab_size: int  # prompt token ids must be below it: the model's vocabulary (its embedding rows)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]: ...


def load_codec(model_dir: Path) -> TextCodec:
    """The checkpoint's tokenizer, as the engine loads it (without loading any weights)."""
    from services.engine.config import ModelConfig
    from services.engine.tokenizer import Tokenizer

    cfg = ModelConfig.from_dir(model_dir)
    tokenizer = Tokenizer(model_dir, extra_eos_ids=tuple(cfg.eos_token_ids))
    # Token-id prompts are checked as the engine checks them: against the model's embedding rows,
    # which a checkpoint's tokenizer may number differently (padded vocabularies, extra tokens).
    tokenizer.vocab_size = cfg.vocab_size
    return tokenizer
