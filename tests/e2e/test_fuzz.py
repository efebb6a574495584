"""A schema-driven fuzzer (schemathesis) against a whole mesh: whatever the gateway's own OpenAPI
schema lets it generate, valid or not, no answer is a 5xx and no process of the mesh dies.

Bounded in wall time (FUZZ_S, plus the mesh's start): each operation gets a share of the budget
in both generation modes, and examples past it are skipped. Generated bodies mostly name the
served model (so requests reach the router and the engine, not only the 404) and ask for few
tokens (so the budget goes on variety, not on decoding).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from services.launch import Mesh

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ_S = 90.0
EXAMPLES = 400  # per operation and mode; the time budget usually ends a run first
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def mesh(start_mesh: Callable[..., Mesh]) -> Iterator[Mesh]:
    with start_mesh("p1,d1") as m:
        yield m


def _steer(body: Any, model: str, use_model: bool) -> Any:
    """The served model name in most bodies, and a small token budget where one would run long.
    Budgets past the context (400) and invalid ones are left for the gateway to refuse."""
    if not isinstance(body, dict):
        return body
    if use_model:
        body["model"] = model
    budgets = [k for k in ("max_tokens", "max_completion_tokens") if k in body]
    for key in budgets:
        value = body[key]
        if type(value) is int and MAX_TOKENS < value <= 4096:
            body[key] = MAX_TOKENS
    if not budgets:
        body["max_tokens"] = MAX_TOKENS  # a chat request's default budget is the whole context
    return body


def test_fuzzed_requests_never_get_a_5xx_and_kill_nothing(mesh: Mesh) -> None:
    schema = schemathesis.openapi.from_url(f"{mesh.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions"}
    # Negative cases (invalid on purpose) need a body to break; the GET routes take nothing.
    runs = [(op, mode) for op in operations for mode in schemathesis.GenerationMode
            if mode == schemathesis.GenerationMode.POSITIVE or op.method.upper() == "POST"]
    statuses: Counter[tuple[str, int]] = Counter()
    server_errors: list[str] = []
    start = time.monotonic()
    for i, (operation, mode) in enumerate(runs):
        _fuzz(mesh, operation, mode, start + FUZZ_S * (i + 1) / len(runs), statuses, server_errors)
    assert not server_errors, f"{len(server_errors)} answers were 5xx:\n" + "\n".join(server_errors[:10])
    assert statuses[("POST /v1/completions", 200)] and statuses[("POST /v1/chat/completions", 200)], statuses
    assert not mesh.dead(), f"mesh processes died: {mesh.dead()}"
    assert all(mesh.restarts(name) == 0 for name, _ in mesh.procs), "a mesh process was restarted"
    assert time.monotonic() - start < FUZZ_S + 60, "the fuzz run overran its budget"


def _fuzz(mesh: Mesh, operation: Any, mode: Any, stop_at: float, statuses: Counter[tuple[str, int]],
          server_errors: list[str]) -> None:
    """One operation in one generation mode until `stop_at`; 5xx answers are recorded, not raised,
    so nothing is shrunk and the run goes on."""
    model = mesh.config.model.name

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=operation.as_strategy(mode), use_model=st.integers(0, 9).map(lambda n: n < 8))
    def fuzz(case: Any, use_model: bool) -> None:
        if time.monotonic() > stop_at:
            return
        case.body = _steer(case.body, model, use_model)
        response = case.call(base_url=mesh.url, timeout=60)
        statuses[(operation.label, response.status_code)] += 1
        if response.status_code >= 500:
            server_errors.append(f"{response.status_code} {response.text[:300]}\n  {case.as_curl_command()}")

    fuzz()
