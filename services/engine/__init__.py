"""The model runtime every prefill and decode group runs: a Llama-family decoder with tensor
parallelism, a paged KV cache and continuous batching. Knows nothing of HTTP, gRPC or Redis."""

from services.engine.config import EngineArgs, ModelConfig
from services.engine.engine import KVExport, LLMEngine, RequestOutput
from services.engine.errors import BadRequestError, EngineError, ModelLoadError
from services.engine.sampling import SamplingParams

__all__ = [
    "BadRequestError", "EngineArgs", "EngineError", "KVExport", "LLMEngine", "ModelConfig",
    "ModelLoadError", "RequestOutput", "SamplingParams",
]
