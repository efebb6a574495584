# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_KIND_UNSPECIFIED: _ClassVar[ErrorKind]
    BAD_REQUEST: _ClassVar[ErrorKind]
    OVERLOADED: _ClassVar[ErrorKind]
    UNAVAILABLE: _ClassVar[ErrorKind]
    INTERNAL: _ClassVar[ErrorKind]
    CANCELLED: _ClassVar[ErrorKind]
ERROR_KIND_UNSPECIFIED: ErrorKind
BAD_REQUEST: ErrorKind
OVERLOADED: ErrorKind
UNAVAILABLE: ErrorKind
INTERNAL: ErrorKind
CANCELLED: ErrorKind

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "has_seed", "seed", "stop_token_ids", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    has_seed: bool
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., has_seed: _Optional[bool] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class QueuedRequest(_message.Message):
    __slots__ = ("request_id", "tier", "arrival_s", "prompt_ids", "sampling", "attempt", "resume_ids", "slo")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_S_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RESUME_IDS_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tier: str
    arrival_s: float
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    attempt: int
    resume_ids: _containers.RepeatedScalarFieldContainer[int]
    slo: TierSLO
    def __init__(self, request_id: _Optional[str] = ..., tier: _Optional[str] = ..., arrival_s: _Optional[float] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., attempt: _Optional[int] = ..., resume_ids: _Optional[_Iterable[int]] = ..., slo: _Optional[_Union[TierSLO, _Mapping]] = ...) -> None: ...

class TierSLO(_message.Message):
    __slots__ = ("ttft_s", "tpot_s", "weight", "max_wait_s")
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    ttft_s: float
    tpot_s: float
    weight: float
    max_wait_s: float
    def __init__(self, ttft_s: _Optional[float] = ..., tpot_s: _Optional[float] = ..., weight: _Optional[float] = ..., max_wait_s: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("kind", "message", "retry_after_s")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    kind: ErrorKind
    message: str
    retry_after_s: float
    def __init__(self, kind: _Optional[_Union[ErrorKind, str]] = ..., message: _Optional[str] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "error", "time_s", "prompt_tokens", "next_group", "index", "attempt")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIME_S_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEXT_GROUP_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    error: Error
    time_s: float
    prompt_tokens: int
    next_group: str
    index: int
    attempt: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., time_s: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., next_group: _Optional[str] = ..., index: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request", "decode_group", "decode_address", "epoch")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DECODE_GROUP_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    request: QueuedRequest
    decode_group: str
    decode_address: str
    epoch: int
    def __init__(self, request: _Optional[_Union[QueuedRequest, _Mapping]] = ..., decode_group: _Optional[str] = ..., decode_address: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class PrefillReply(_message.Message):
    __slots__ = ("error", "first_token", "finished", "prefill_s", "transfer_s")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    error: Error
    first_token: int
    finished: bool
    prefill_s: float
    transfer_s: float
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., first_token: _Optional[int] = ..., finished: _Optional[bool] = ..., prefill_s: _Optional[float] = ..., transfer_s: _Optional[float] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("ready", "group_id", "role", "tp", "epoch", "running", "free_kv_blocks")
    READY_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    group_id: str
    role: str
    tp: int
    epoch: int
    running: int
    free_kv_blocks: int
    def __init__(self, ready: _Optional[bool] = ..., group_id: _Optional[str] = ..., role: _Optional[str] = ..., tp: _Optional[int] = ..., epoch: _Optional[int] = ..., running: _Optional[int] = ..., free_kv_blocks: _Optional[int] = ...) -> None: ...

class KVHandoffHeader(_message.Message):
    __slots__ = ("request", "output_ids", "num_tokens", "total_bytes", "epoch")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    request: QueuedRequest
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    total_bytes: int
    epoch: int
    def __init__(self, request: _Optional[_Union[QueuedRequest, _Mapping]] = ..., output_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., total_bytes: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: KVHandoffHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[KVHandoffHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class KVAck(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: Error
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ReserveKVRequest(_message.Message):
    __slots__ = ("request", "num_tokens", "src_tp", "transfer_id", "timeout_s", "epoch", "backend")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SRC_TP_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    request: QueuedRequest
    num_tokens: int
    src_tp: int
    transfer_id: str
    timeout_s: float
    epoch: int
    backend: str
    def __init__(self, request: _Optional[_Union[QueuedRequest, _Mapping]] = ..., num_tokens: _Optional[int] = ..., src_tp: _Optional[int] = ..., transfer_id: _Optional[str] = ..., timeout_s: _Optional[float] = ..., epoch: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class ReserveKVReply(_message.Message):
    __slots__ = ("error", "block_ids", "tp", "agent_metadata")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    error: Error
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    tp: int
    agent_metadata: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., block_ids: _Optional[_Iterable[int]] = ..., tp: _Optional[int] = ..., agent_metadata: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CommitKVRequest(_message.Message):
    __slots__ = ("request_id", "transfer_id", "output_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_id: str
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., transfer_id: _Optional[str] = ..., output_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitKVReply(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: Error
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ReleaseKVRequest(_message.Message):
    __slots__ = ("request_id", "transfer_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_id: str
    def __init__(self, request_id: _Optional[str] = ..., transfer_id: _Optional[str] = ...) -> None: ...

class ReleaseKVReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("tp", "rank")
    TP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    tp: int
    rank: int
    def __init__(self, tp: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class SlotLayout(_message.Message):
    __slots__ = ("slot", "layout")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    slot: int
    layout: Layout
    def __init__(self, slot: _Optional[int] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ...) -> None: ...

class GroupAddress(_message.Message):
    __slots__ = ("group_id", "address")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    address: str
    def __init__(self, group_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("epoch", "group_id", "role", "tp", "rank")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    group_id: str
    role: str
    tp: int
    rank: int
    def __init__(self, epoch: _Optional[int] = ..., group_id: _Optional[str] = ..., role: _Optional[str] = ..., tp: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class StatusCommand(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResult(_message.Message):
    __slots__ = ("index", "pid", "address", "held", "group", "held_bytes", "serving", "parked", "kv_backend")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    PARKED_FIELD_NUMBER: _ClassVar[int]
    KV_BACKEND_FIELD_NUMBER: _ClassVar[int]
    index: int
    pid: int
    address: str
    held: Layout
    group: Assignment
    held_bytes: int
    serving: bool
    parked: int
    kv_backend: str
    def __init__(self, index: _Optional[int] = ..., pid: _Optional[int] = ..., address: _Optional[str] = ..., held: _Optional[_Union[Layout, _Mapping]] = ..., group: _Optional[_Union[Assignment, _Mapping]] = ..., held_bytes: _Optional[int] = ..., serving: _Optional[bool] = ..., parked: _Optional[int] = ..., kv_backend: _Optional[str] = ...) -> None: ...

class OpenStoreCommand(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenStoreResult(_message.Message):
    __slots__ = ("addr",)
    ADDR_FIELD_NUMBER: _ClassVar[int]
    addr: str
    def __init__(self, addr: _Optional[str] = ...) -> None: ...

class DrainCommand(_message.Message):
    __slots__ = ("finish_within", "wait_s", "targets")
    FINISH_WITHIN_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    finish_within: int
    wait_s: float
    targets: _containers.RepeatedCompositeFieldContainer[GroupAddress]
    def __init__(self, finish_within: _Optional[int] = ..., wait_s: _Optional[float] = ..., targets: _Optional[_Iterable[_Union[GroupAddress, _Mapping]]] = ...) -> None: ...

class DrainResult(_message.Message):
    __slots__ = ("finished", "migrated", "parked", "in_flight")
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    MIGRATED_FIELD_NUMBER: _ClassVar[int]
    PARKED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    finished: int
    migrated: int
    parked: int
    in_flight: int
    def __init__(self, finished: _Optional[int] = ..., migrated: _Optional[int] = ..., parked: _Optional[int] = ..., in_flight: _Optional[int] = ...) -> None: ...

class ReleaseCommand(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseResult(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReshardCommand(_message.Message):
    __slots__ = ("store", "prefix", "held", "need")
    STORE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    NEED_FIELD_NUMBER: _ClassVar[int]
    store: str
    prefix: str
    held: _containers.RepeatedCompositeFieldContainer[SlotLayout]
    need: _containers.RepeatedCompositeFieldContainer[SlotLayout]
    def __init__(self, store: _Optional[str] = ..., prefix: _Optional[str] = ..., held: _Optional[_Iterable[_Union[SlotLayout, _Mapping]]] = ..., need: _Optional[_Iterable[_Union[SlotLayout, _Mapping]]] = ...) -> None: ...

class ReshardResult(_message.Message):
    __slots__ = ("kept_bytes", "peer_bytes", "disk_bytes", "sent_bytes", "seconds")
    KEPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEER_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    kept_bytes: int
    peer_bytes: int
    disk_bytes: int
    sent_bytes: int
    seconds: float
    def __init__(self, kept_bytes: _Optional[int] = ..., peer_bytes: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., sent_bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ActivateCommand(_message.Message):
    __slots__ = ("group", "store", "prefix")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    group: Assignment
    store: str
    prefix: str
    def __init__(self, group: _Optional[_Union[Assignment, _Mapping]] = ..., store: _Optional[str] = ..., prefix: _Optional[str] = ...) -> None: ...

class ActivateResult(_message.Message):
    __slots__ = ("address", "seconds")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    address: str
    seconds: float
    def __init__(self, address: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class ResumeCommand(_message.Message):
    __slots__ = ("targets",)
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[GroupAddress]
    def __init__(self, targets: _Optional[_Iterable[_Union[GroupAddress, _Mapping]]] = ...) -> None: ...

class ResumeResult(_message.Message):
    __slots__ = ("migrated", "parked")
    MIGRATED_FIELD_NUMBER: _ClassVar[int]
    PARKED_FIELD_NUMBER: _ClassVar[int]
    migrated: int
    parked: int
    def __init__(self, migrated: _Optional[int] = ..., parked: _Optional[int] = ...) -> None: ...

class SlotCommand(_message.Message):
    __slots__ = ("status", "open_store", "drain", "release", "reshard", "activate", "resume")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OPEN_STORE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    RESHARD_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    status: StatusCommand
    open_store: OpenStoreCommand
    drain: DrainCommand
    release: ReleaseCommand
    reshard: ReshardCommand
    activate: ActivateCommand
    resume: ResumeCommand
    def __init__(self, status: _Optional[_Union[StatusCommand, _Mapping]] = ..., open_store: _Optional[_Union[OpenStoreCommand, _Mapping]] = ..., drain: _Optional[_Union[DrainCommand, _Mapping]] = ..., release: _Optional[_Union[ReleaseCommand, _Mapping]] = ..., reshard: _Optional[_Union[ReshardCommand, _Mapping]] = ..., activate: _Optional[_Union[ActivateCommand, _Mapping]] = ..., resume: _Optional[_Union[ResumeCommand, _Mapping]] = ...) -> None: ...

class SlotReply(_message.Message):
    __slots__ = ("error", "status", "open_store", "drain", "release", "reshard", "activate", "resume")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OPEN_STORE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    RESHARD_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    error: Error
    status: StatusResult
    open_store: OpenStoreResult
    drain: DrainResult
    release: ReleaseResult
    reshard: ReshardResult
    activate: ActivateResult
    resume: ResumeResult
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., status: _Optional[_Union[StatusResult, _Mapping]] = ..., open_store: _Optional[_Union[OpenStoreResult, _Mapping]] = ..., drain: _Optional[_Union[DrainResult, _Mapping]] = ..., release: _Optional[_Union[ReleaseResult, _Mapping]] = ..., reshard: _Optional[_Union[ReshardResult, _Mapping]] = ..., activate: _Optional[_Union[ActivateResult, _Mapping]] = ..., resume: _Optional[_Union[ResumeResult, _Mapping]] = ...) -> None: ...
