"""gRPC messages and services between Nitsum's processes (see nitsum.proto; regenerate with gen.sh),
the one channel pool every client uses, and the one way to build an error."""

from . import nitsum_pb2 as pb
from . import nitsum_pb2_grpc as pb_grpc
from .channels import CHANNEL_OPTIONS, ChannelPool

__all__ = ["CHANNEL_OPTIONS", "ChannelPool", "engine_id", "error", "pb", "pb_grpc", "request_of"]


def error(kind: int, message: str, retry_after_s: float = 0.0) -> pb.Error:
    """An error for a reply or a token event: its kind says whose fault it is (nitsum.proto)."""
    return pb.Error(kind=kind, message=message, retry_after_s=retry_after_s)  # type: ignore[arg-type]


def engine_id(request: pb.QueuedRequest) -> str:
    """The id a group's engine knows this attempt of the request by. A request resumed after its
    group died (attempt > 0) may meet an older attempt of itself still running on a group that was
    only slow: the two never collide."""
    return request.request_id if request.attempt == 0 else f"{request.request_id}#{request.attempt}"


def request_of(engine_request_id: str) -> str:
    """The client's request id of an engine id (see `engine_id`)."""
    return engine_request_id.split("#", 1)[0]
