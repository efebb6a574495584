"""kvtransfer tests use the engine's tiny checkpoints."""

from tests.engine.conftest import llama_dir, reference  # noqa: F401  (fixtures, re-exported)
