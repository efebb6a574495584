"""Redis key names and the typed records stored under them (see README.md for the schema).

Every key starts with the prefix (default `nitsum:`) so several meshes can share one server.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_PREFIX = "nitsum:"
ROUTER_GROUP = "routers"  # the consumer group every router joins on every tier stream


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def queue(self, tier: str) -> str:
        return f"{self.prefix}queue:{tier}"

    def output(self, request_id: str) -> str:
        return f"{self.prefix}out:{request_id}"

    def cancelled(self, request_id: str) -> str:
        return f"{self.prefix}cancelled:{request_id}"

    def prefill_claim(self, request_id: str, attempt: int = 0) -> str:
        return f"{self.prefix}prefill:{request_id}:{attempt}"

    @property
    def inflight(self) -> str:
        """Hash: request id -> its QueuedRequest, from dispatch to its last event."""
        return f"{self.prefix}inflight"

    @property
    def holders(self) -> str:
        """Hash: request id -> the group or slot holding it now ("router" while re-queued)."""
        return f"{self.prefix}holders"

    @property
    def observed(self) -> str:
        """Stream: what the gateways saw of each request (arrival; outcome, lengths, TTFT, TPOT), capped;
        the autopilot's workload estimate and measured goodput (router/live/autopilot.py)."""
        return f"{self.prefix}observed"

    @property
    def decisions(self) -> str:
        """List: the autopilot's last decisions, newest first (capped), so a new leader keeps them."""
        return f"{self.prefix}decisions"

    @property
    def restarts(self) -> str:
        """Hash: process name -> times `nitsum up` restarted it."""
        return f"{self.prefix}restarts"

    def wake(self, owner: str) -> str:
        """A private stream whose entry ends `owner`'s blocked read of output streams."""
        return f"{self.prefix}wake:{owner}"

    @property
    def cancel_channel(self) -> str:
        return f"{self.prefix}cancel"

    def slot(self, slot_id: str) -> str:
        return f"{self.prefix}slot:{slot_id}"

    @property
    def slots(self) -> str:
        return f"{self.prefix}slots"

    def group(self, group_id: str) -> str:
        return f"{self.prefix}group:{group_id}"

    @property
    def groups(self) -> str:
        return f"{self.prefix}groups"

    @property
    def plan(self) -> str:
        return f"{self.prefix}plan"

    @property
    def leader(self) -> str:
        return f"{self.prefix}router:leader"

    # ---- the Files and Batch API (services/cluster/batch_store.py) ----
    def file(self, file_id: str) -> str:
        """Hash: a file's record (`FileRecord`)."""
        return f"{self.prefix}file:{file_id}"

    def file_content(self, file_id: str) -> str:
        """String: a file's bytes."""
        return f"{self.prefix}file:{file_id}:content"

    def batch(self, batch_id: str) -> str:
        """Hash: a batch's record (`BatchRecord`)."""
        return f"{self.prefix}batch:{batch_id}"

    def batch_results(self, batch_id: str, kind: str) -> str:
        """Hash: line index -> its output line; `kind` "out" (answered 200) or "err" (failed)."""
        return f"{self.prefix}batch:{batch_id}:{kind}"

    def batch_running(self, batch_id: str) -> str:
        """Hash: line index -> the request in flight for it (entry id, then its QueuedRequest)."""
        return f"{self.prefix}batch:{batch_id}:running"

    def batch_lease(self, batch_id: str) -> str:
        """String: the id of the gateway that runs the batch, with a lease (PX)."""
        return f"{self.prefix}batch:{batch_id}:lease"

    def batches_of(self, owner: str) -> str:
        """Sorted set: an owner's batch ids by creation time (the list endpoint's pages)."""
        return f"{self.prefix}batches:by-owner:{owner}"

    @property
    def batches_active(self) -> str:
        """Set: ids of batches not yet in a final state (gateways take the ones nobody runs)."""
        return f"{self.prefix}batches:active"


def _encode(record: Any) -> dict[str, str]:
    return {k: str(int(v) if isinstance(v, bool) else v) for k, v in asdict(record).items()}


def _decode(cls: type, raw: dict[str, str]) -> Any:
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        text = raw[f.name]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        values[f.name] = int(text) if kind == "int" else float(text) if kind == "float" else text
    return cls(**values)


@dataclass(frozen=True)
class GroupRecord:
    """A group as its leader announces it, refreshed by heartbeats; gone when its lease expires."""

    group_id: str
    role: str  # "prefill" | "decode" | "colocated"
    tp: int
    epoch: int
    address: str  # host:port of the leader's gRPC server
    running: int = 0
    max_running: int = 0
    free_kv_blocks: int = 0
    used_kv_blocks: int = 0
    block_size: int = 16
    max_model_len: int = 0
    queued_tokens: int = 0  # prompt tokens not computed yet
    # Measured (the leader's step-time model, services/engine/policy.py): prompt tokens a second
    # when prefill is all a step does, and a step's seconds = base + per token x prompt tokens +
    # per decode x decoding sequences + per context x KV tokens they read; 0 until known.
    prefill_tokens_per_s: float = 0.0
    step_base_s: float = 0.0
    step_per_token_s: float = 0.0
    step_per_decode_s: float = 0.0
    step_per_context_s: float = 0.0
    model: str = ""
    pid: int = 0
    aborted: int = 0  # requests aborted since start (client gone): their KV blocks were freed

    @property
    def phases(self) -> tuple[str, ...]:
        """The phases of a request this group serves: a colocated group prefills and decodes."""
        return ("prefill", "decode") if self.role == "colocated" else (self.role,)

    def encode(self) -> dict[str, str]:
        return _encode(self)

    @classmethod
    def decode(cls, raw: dict[str, str]) -> GroupRecord:
        return _decode(cls, raw)


@dataclass(frozen=True)
class SlotRecord:
    """One slot (one process standing in for one accelerator) and the group it serves in."""

    slot_id: str
    group_id: str
    rank: int
    role: str
    tp: int
    epoch: int
    pid: int = 0
    address: str = ""  # host:port of the slot's SlotControl server (re-cut slots only)
    index: int = -1  # the slot's place in plans (re-cut slots only)

    def encode(self) -> dict[str, str]:
        return _encode(self)

    @classmethod
    def decode(cls, raw: dict[str, str]) -> SlotRecord:
        return _decode(cls, raw)


@dataclass(frozen=True)
class PlanDoc:
    """The plan the cluster runs, stored under `nitsum:plan`: written by the orchestrator (and, to
    seed it, `nitsum up`), read by a router that takes the lead. The plans are JSON in the form of
    docs/plan.schema.json (`router.decide.plans.Plan.to_json`), opaque to this layer."""

    epoch: int
    plan: str  # the plan the slots are brought to
    target: str = ""  # the plan asked for (a plan cut down around a dead slot goes back to it); "": plan
    reconfiguring: bool = False
    applied: bool = False  # False until the orchestrator has brought the slots to `plan`
    set_at: float = 0.0

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: str | bytes) -> PlanDoc:
        doc = json.loads(raw)
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})
