"""One frozen, validated config per service, built once at start from CLI flags and the tiers file.

The tiers file (JSON, or TOML by its `.toml` extension) says which tiers exist, which API keys
may use which tiers, and how OpenAI's `service_tier` maps onto tiers:

    {"tiers": [{"name": "interactive", "ttft_s": 0.5, "tpot_s": 0.05, "weight": 4, "queue_limit": 128}],
     "default_tier": "interactive",
     "api_keys": {"sk-team-a": {"tiers": ["interactive"], "default_tier": "interactive"}},
     "service_tiers": {"priority": "interactive", "default": "interactive", "auto": "interactive"}}

Every section is optional; without a file Nitsum serves `services.tiers.DEFAULT_TIERS`, accepts
any (or no) key, and maps `service_tier` as OpenAI's names suggest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.tiers import DEFAULT_TIERS, Tier

KVBackendSetting = Literal["grpc", "auto", "nixl", "local"]  # NodeConfig.kv_backend
DEFAULT_SERVICE_TIERS = {"priority": "interactive", "default": "standard", "auto": "standard", "flex": "batch"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ApiKeyPolicy(_Frozen):
    tiers: tuple[str, ...]
    default_tier: str | None = None

    @model_validator(mode="after")
    def _default_allowed(self) -> ApiKeyPolicy:
        if not self.tiers:
            raise ValueError("an API key must allow at least one tier")
        if self.default_tier is not None and self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not one of the key's tiers {list(self.tiers)}")
        return self


class TierPolicy(_Frozen):
    """Tiers, API keys and the `service_tier` mapping: what the gateway and router share."""

    tiers: tuple[Tier, ...] = DEFAULT_TIERS
    default_tier: str = "standard"
    api_keys: dict[str, ApiKeyPolicy] = Field(default_factory=dict)
    service_tiers: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_SERVICE_TIERS))

    @model_validator(mode="after")
    def _names_known(self) -> TierPolicy:
        names = [t.name for t in self.tiers]
        if not names:
            raise ValueError("at least one tier is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"tier names repeat: {names}")
        known = set(names)
        if self.default_tier not in known:
            if self.default_tier == "standard" and "default_tier" not in self.model_fields_set:
                object.__setattr__(self, "default_tier", names[0])
            else:
                raise ValueError(f"default_tier {self.default_tier!r} is not a tier; tiers are {names}")
        for key, policy in self.api_keys.items():
            unknown = set(policy.tiers) - known
            if unknown:
                raise ValueError(f"API key {key[:4]}...: unknown tiers {sorted(unknown)}; tiers are {names}")
        mapping = {k: v for k, v in self.service_tiers.items() if v in known}
        if "service_tiers" in self.model_fields_set and mapping != self.service_tiers:
            bad = {k: v for k, v in self.service_tiers.items() if v not in known}
            raise ValueError(f"service_tiers map to unknown tiers {bad}; tiers are {names}")
        object.__setattr__(self, "service_tiers", mapping)
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def grant_for(self, key: str) -> ApiKeyPolicy | None:
        """What API key `key` may do, or None for a key not configured here.

        Every configured key is compared, each in constant time on digests of equal length, with no
        early exit: how long this takes says nothing about how close a guessed key came to one.
        """
        probe = hashlib.sha256(key.encode()).digest()
        found: ApiKeyPolicy | None = None
        for known, grant in self.api_keys.items():
            if hmac.compare_digest(probe, hashlib.sha256(known.encode()).digest()):
                found = grant
        return found

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @classmethod
    def load(cls, path: str | Path | None) -> TierPolicy:
        """Read the tiers file (JSON or TOML); None means the defaults."""
        if path is None:
            return cls()
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ValueError(f"tiers file {p}: {e.strerror}") from e
        try:
            doc = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"tiers file {p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from e
        if "tiers" in doc:
            doc["tiers"] = tuple(Tier(**t) for t in doc["tiers"])
        return cls.model_validate(doc)


class RedisSettings(_Frozen):
    url: str
    prefix: str = "nitsum:"


class GatewayConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model: Path
    model_name: str = ""  # the id /v1/models shows; default: the model folder's name
    redis: RedisSettings
    policy: TierPolicy = Field(default_factory=TierPolicy)
    request_timeout_s: float = Field(default=600.0, gt=0)
    first_event_timeout_s: float = Field(default=120.0, gt=0)
    readiness_cache_s: float = Field(default=0.25, ge=0)
    retry_after_s: int = Field(default=1, ge=1)
    # A role (prefill, decode, router) that served within this long is waited for, not answered
    # 503: a slot being restarted or re-cut, a standby router taking over.
    role_grace_s: float = Field(default=15.0, ge=0)
    # A waiting request fails (503) once no router has led for this long, or Redis has been
    # unreachable this long, instead of waiting for its timeout.
    router_grace_s: float = Field(default=10.0, gt=0)
    # Largest request body accepted (413 above it): bounds what one request can make the gateway
    # parse and tokenize. 4 MiB holds a prompt far longer than any context served.
    max_body_bytes: int = Field(default=4 << 20, ge=1024)

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model.name


class RouterConfig(_Frozen):
    router_id: str
    redis: RedisSettings
    policy: TierPolicy = Field(default_factory=TierPolicy)
    read_block_ms: int = Field(default=5, ge=1)
    read_count: int = Field(default=256, ge=1)
    claim_idle_ms: int = Field(default=5000, ge=1)
    leader_ttl_ms: int = Field(default=3000, ge=100)
    rpc_timeout_s: float = Field(default=120.0, gt=0)
    group_refresh_s: float = Field(default=0.1, gt=0)
    # Requests a prefill group may hold (prefilling or handing off) before the rest wait in the
    # router's tier-ordered queue: what a late interactive request can find ahead of it there.
    prefill_window: int = Field(default=8, ge=1)
    # "tier": deadline order, the lowest tier's reserved share, decode slots within the others'
    # TPOT (router/decide/scheduler.py); "fcfs": arrival order, no reservations (the baseline).
    schedule: Literal["tier", "fcfs"] = "tier"
    background_share: float = Field(default=0.75, gt=0, le=1)
    tpot_guard: float = Field(default=0.9, ge=0)


class NodeConfig(_Frozen):
    """One slot process of a prefill, decode or colocated group; rank 0 is the group's leader."""

    role: Literal["prefill", "decode", "colocated"]
    model: Path
    group_id: str
    rank: int = Field(default=0, ge=0)
    tp: int = Field(default=1, ge=1)
    epoch: int = Field(default=0, ge=0)
    slot_id: str = ""
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)  # gRPC port of the leader (0: a free one)
    metrics_port: int = Field(default=0, ge=0, le=65535)  # 0: no /metrics server
    redis: RedisSettings
    dist_addr: str | None = None  # host:port of the group's TCPStore when tp > 1
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = Field(default=16, ge=1)
    max_num_seqs: int = Field(default=64, ge=1)
    lease_ms: int = Field(default=3000, ge=100)
    heartbeat_s: float = Field(default=0.5, gt=0)
    kv_chunk_bytes: int = Field(default=4 << 20, ge=1024)
    kv_timeout_s: float = Field(default=30.0, gt=0)  # one KV hand-off attempt, sent to received
    kv_handoff_attempts: int = Field(default=3, ge=1)  # decode groups tried before the request fails
    # How KV moves prefill -> decode: "grpc" gathers it on the prefill leader and streams bytes;
    # "auto" | "nixl" | "local" use the block path (every rank writes its own heads through its
    # own agent: NIXL where it works for auto, else sockets), falling back to gRPC when it fails.
    kv_backend: KVBackendSetting = "auto"

    @model_validator(mode="after")
    def _group_shape(self) -> NodeConfig:
        if self.rank >= self.tp:
            raise ValueError(f"rank {self.rank} is outside a group of tp {self.tp}; ranks are 0..{self.tp - 1}")
        if self.tp > 1 and not self.dist_addr:
            raise ValueError("a group with tp > 1 needs --dist-addr host:port (its TCPStore)")
        return self

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def dist_prefix(self) -> str:
        return f"epoch{self.epoch}/group-{self.group_id}/"

    @property
    def effective_slot_id(self) -> str:
        return self.slot_id or f"{self.group_id}-r{self.rank}"


@dataclass(frozen=True)
class SlotConfig:
    """One slot process (`nitsum slot`): the accelerator it stands for and how it serves in groups."""

    index: int
    model: Path
    redis: RedisSettings
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 64
    lease_ms: int = 3000
    heartbeat_s: float = 0.5
    dist_timeout_s: float = 60.0
    kv_cache_bytes: int = 1 << 30
    kv_backend: KVBackendSetting = "auto"  # NodeConfig.kv_backend of every group this slot leads
    schedule: str = "tier"  # the engine's policy (services/engine/policy.py): "tier" or "fcfs"
    max_step_s: float = 0.0  # > 0: a step carrying prompt tokens fits this (policy.step_cap_s)

    @property
    def slot_id(self) -> str:
        return f"slot:{self.index}"
