"""The orchestrator's side of the slots' control service: one typed command, one typed result."""

from __future__ import annotations

from typing import Any

import grpc

from services.rpc import ChannelPool, pb, pb_grpc


class ReconfigError(RuntimeError):
    """A step of a reconfiguration failed."""


class SlotClient:
    def __init__(self, channels: ChannelPool) -> None:
        self.channels = channels

    async def call(self, address: str, command: pb.SlotCommand, timeout_s: float = 120.0) -> Any:
        """The result of the command's verb (its `*Result` message); ReconfigError on any failure."""
        verb = command.WhichOneof("verb")
        stub = pb_grpc.SlotControlStub(self.channels.get(address))
        try:
            reply = await stub.Command(command, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise ReconfigError(f"slot at {address}: {verb}: {e.code().name} {e.details() or ''}".strip()) from e
        if reply.error.kind != pb.ERROR_KIND_UNSPECIFIED:
            raise ReconfigError(reply.error.message)
        if reply.WhichOneof("result") != verb:
            raise ReconfigError(f"slot at {address}: {verb}: answered {reply.WhichOneof('result')}")
        return getattr(reply, verb)

    async def status(self, address: str, timeout_s: float) -> pb.StatusResult:
        result: pb.StatusResult = await self.call(address, pb.SlotCommand(status=pb.StatusCommand()), timeout_s)
        return result

    async def open_store(self, address: str) -> str:
        result = await self.call(address, pb.SlotCommand(open_store=pb.OpenStoreCommand()))
        return str(result.addr)

    async def drain(self, address: str, finish_within: int, wait_s: float, targets: list[tuple[str, str]],
                    timeout_s: float) -> pb.DrainResult:
        cmd = pb.DrainCommand(finish_within=finish_within, wait_s=wait_s, targets=_addresses(targets))
        result: pb.DrainResult = await self.call(address, pb.SlotCommand(drain=cmd), timeout_s)
        return result

    async def release(self, address: str, timeout_s: float) -> None:
        await self.call(address, pb.SlotCommand(release=pb.ReleaseCommand()), timeout_s)

    async def reshard(self, address: str, store: str, prefix: str, held: dict[int, tuple[int, int]],
                      need: dict[int, tuple[int, int]], timeout_s: float) -> pb.ReshardResult:
        cmd = pb.ReshardCommand(store=store, prefix=prefix, held=_layouts(held), need=_layouts(need))
        result: pb.ReshardResult = await self.call(address, pb.SlotCommand(reshard=cmd), timeout_s)
        return result

    async def activate(self, address: str, group: pb.Assignment, store: str, prefix: str,
                       timeout_s: float) -> pb.ActivateResult:
        cmd = pb.ActivateCommand(group=group, store=store, prefix=prefix)
        result: pb.ActivateResult = await self.call(address, pb.SlotCommand(activate=cmd), timeout_s)
        return result

    async def resume(self, address: str, targets: list[tuple[str, str]], timeout_s: float) -> pb.ResumeResult:
        cmd = pb.ResumeCommand(targets=_addresses(targets))
        result: pb.ResumeResult = await self.call(address, pb.SlotCommand(resume=cmd), timeout_s)
        return result


def _addresses(targets: list[tuple[str, str]]) -> list[pb.GroupAddress]:
    return [pb.GroupAddress(group_id=g, address=a) for g, a in targets]


def _layouts(layouts: dict[int, tuple[int, int]]) -> list[pb.SlotLayout]:
    return [pb.SlotLayout(slot=i, layout=pb.Layout(tp=tp, rank=rank)) for i, (tp, rank) in sorted(layouts.items())]
