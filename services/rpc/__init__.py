"""gRPC messages and services between Nitsum's processes (see nitsum.proto); regenerate with gen.sh."""

from . import nitsum_pb2 as pb
from . import nitsum_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
