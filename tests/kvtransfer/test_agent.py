"""The block transfer interface: descriptor chunking, published metadata, backend choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtransfer.agent import make_agent
from kvtransfer.agent_base import AgentInfo, check_descriptors, chunk_descriptors
from kvtransfer.nixl_backend import nixl_works


def test_chunks_cover_every_byte_in_order_and_stay_bounded() -> None:
    descs = np.array([[0, 1000, 100], [500, 0, 7], [200, 300, 30]], dtype=np.int64)
    chunks = chunk_descriptors(descs, 16)
    rows = np.concatenate(chunks)
    src = np.concatenate([np.arange(s, s + n) for s, _, n in rows.tolist()])
    dst = np.concatenate([np.arange(d, d + n) for _, d, n in rows.tolist()])
    want_src = np.concatenate([np.arange(s, s + n) for s, _, n in descs.tolist()])
    want_dst = np.concatenate([np.arange(d, d + n) for _, d, n in descs.tolist()])
    np.testing.assert_array_equal(src, want_src)
    np.testing.assert_array_equal(dst, want_dst)
    assert all(c[:, 2].sum() <= 32 for c in chunks)
    assert chunk_descriptors(np.zeros((0, 3), dtype=np.int64), 16) == []


def test_descriptors_outside_the_cache_are_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        check_descriptors(np.array([[0, 90, 20]]), 100, 100)


def test_metadata_round_trips_through_bytes() -> None:
    info = AgentInfo("p0-r1", "nixl", 1 << 40, 4096, b"\x00\xffmeta")
    assert AgentInfo.from_bytes(info.to_bytes()) == info


def test_auto_picks_nixl_where_it_works() -> None:
    agent = make_agent("auto", "auto-pick", torch.zeros(1024, dtype=torch.bfloat16))
    try:
        assert agent.backend_name == ("nixl" if nixl_works() else "local")
    finally:
        agent.close()


def test_mixed_backends_refuse_to_pair() -> None:
    a = make_agent("local", "mix-a", torch.zeros(64))
    try:
        bad = AgentInfo("mix-b", "nixl", 0, 256, b"").to_bytes()
        with pytest.raises(ValueError, match="backend"):
            a.add_peer(bad)
    finally:
        a.close()
