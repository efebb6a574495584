"""The engine's error kinds, so that every boundary (CLI, gRPC, HTTP) can map them.

- `ModelLoadError`: the checkpoint folder or its config is unusable (missing file, unsupported
  architecture, bad field). The message names the file or field to fix.
- `BadRequestError`: the request itself cannot be served (prompt too long, cannot fit in the KV
  cache, bad sampling parameters). The client's fault; the message says what to change.
- `EngineError`: our fault (a worker died, a collective timed out). Logged with the request id.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """Something went wrong inside the engine; not the caller's fault."""


class ModelLoadError(EngineError):
    """The model folder cannot be loaded as given."""


class BadRequestError(ValueError):
    """The request cannot be served as given; the message tells the client what to change."""
