"""The model runtime every prefill and decode group runs: a Llama-family decoder with tensor
parallelism, a paged KV cache and continuous batching. Knows nothing of HTTP, gRPC or Redis.

Names are loaded on first use, so importing `services.engine.errors` (the CLI, the gateway) does
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EngineArgs": "services.engine.config", "ModelConfig": "services.engine.config",
    "KVExport": "services.engine.kv_io", "LLMEngine": "services.engine.engine",
    "RequestOutput": "services.engine.engine", "BadRequestError": "services.engine.errors",
    "EngineError": "services.engine.errors", "ModelLoadError": "services.engine.errors",
    "SamplingParams": "services.engine.model.sampling",
}

if TYPE_CHECKING:
    from services.engine.config import EngineArgs, ModelConfig
    from services.engine.engine import LLMEngine, RequestOutput
    from services.engine.errors import BadRequestError, EngineError, ModelLoadError
    from services.engine.kv_io import KVExport
    from services.engine.model.sampling import SamplingParams

__all__ = [
    "BadRequestError", "EngineArgs", "EngineError", "KVExport", "LLMEngine", "ModelConfig",
    "ModelLoadError", "RequestOutput", "SamplingParams",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'services.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
