"""A KV hand-off whose receiving process dies mid-way: the request completes on the other decode
group with the engine's greedy text, and no KV blocks stay in use on the groups that survive.
Over the gRPC path and over the block path (`--kv-backend auto`).

Plan p1,d1,d1; the decode leader on slot 1 runs with the test hook `NITSUM_TEST_FAULT=kv-receive`
(kvtransfer/faults.py): it SIGKILLs itself once the first chunk of a hand-off has arrived (block
path: once its rank awaits the KV)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from services.launch import LaunchConfig, Mesh
from tests.e2e.helpers import records, wait_for

DOOMED_SLOT = 1


@pytest.fixture(scope="module", params=["grpc", "auto"])
def mesh(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp(f"mesh-handoff-{request.param}")
    env = {i: {"NITSUM_KV_BACKEND": request.param} for i in range(3)}
    env[DOOMED_SLOT]["NITSUM_TEST_FAULT"] = "kv-receive"
    config = LaunchConfig(model=tiny_model_dir, plan="p1,d1,d1", port=0, log_dir=root / "logs", startup_timeout_s=120,
                          slot_env=env)
    with Mesh(config) as m:
        wait_for(lambda: len(_groups(m)) == 3, 30, "three groups registered")
        yield m


def _groups(mesh: Mesh) -> dict[str, dict[str, str]]:
    return {g["group_id"]: g for g in records(mesh, "group")}


def _slot(mesh: Mesh, index: int):  # type: ignore[no-untyped-def]
    return next(p for n, p in mesh.procs if n == f"slot{index}")


def test_receiver_killed_mid_handoff_request_completes_elsewhere(mesh: Mesh, reference) -> None:  # type: ignore[no-untyped-def]
    doomed = _slot(mesh, DOOMED_SLOT)
    doomed_group = next(g["group_id"] for g in _groups(mesh).values() if int(g["pid"]) == doomed.pid)
    prompts = [[(7 * i + j) % 400 + 3 for j in range(5 + 3 * i)] for i in range(12)]
    texts: dict[int, str] = {}

    async def one(client: openai.AsyncOpenAI, i: int) -> None:
        reply = await client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10, temperature=0)
        texts[i] = reply.choices[0].text

    async def drive() -> None:
        client = openai.AsyncOpenAI(base_url=f"{mesh.url}/v1", api_key="sk-e2e", max_retries=0, timeout=60)
        # Rounds of concurrent requests until one was handed to the doomed decode group, then one
        # more round while its record is still leased (the router may still pick it).
        for start in range(0, len(prompts), 3):
            await asyncio.gather(*(one(client, i) for i in range(start, start + 3)))
            if doomed.poll() is not None and start >= 3:
                break
        await client.close()

    asyncio.run(drive())

    assert doomed.poll() == -9, "no hand-off reached the doomed decode group"
    tok = reference.tokenizer
    wrong = [i for i, text in texts.items() if text != tok.decode(reference(prompts[i], 10))]
    assert not wrong and len(texts) >= 6, (wrong, len(texts))
    failovers = mesh.log_tail("slot0", 200_000).count("handing it to")
    assert failovers >= 1  # the prefill leader failed over
    print(f"{len(texts)} requests, {failovers} failed over")

    # Nothing leaked on the groups that survive (their heartbeats carry the block counts), and
    # the dead group's lease runs out.
    def settled() -> bool:
        groups = _groups(mesh)
        return doomed_group not in groups and len(groups) == 2 and all(
            int(g["used_kv_blocks"]) == 0 and int(g["running"]) == 0 for g in groups.values())

    wait_for(settled, 10, f"surviving groups at 0 used KV blocks: {_groups(mesh)}")
