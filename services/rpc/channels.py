"""One gRPC channel per address, shared by every stub of a process that talks to it.

A channel reconnects by itself after its peer restarts, so a pool never needs to forget an
address; `close()` closes them all on shutdown."""

from __future__ import annotations

import grpc

# KV hand-offs over gRPC and slot commands carry up to tens of MiB.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


class ChannelPool:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
