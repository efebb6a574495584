"""A message and its follower handler, registered on import, for tests/engine/test_worker.py: a
module outside the engine, as kvtransfer's are."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.worker import Closeable, RankContext, register_handler


@dataclass
class ReportRank:
    offset: int


def _report_rank(rank: RankContext, msg: ReportRank) -> None:
    rank.all_gather(torch.tensor([rank.rank + msg.offset]))


@dataclass
class KeepResource:
    resource: Closeable


def _keep_resource(rank: RankContext, msg: KeepResource) -> None:
    rank.resources["test"] = msg.resource


register_handler(ReportRank, _report_rank)
register_handler(KeepResource, _keep_resource)
