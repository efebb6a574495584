"""Redis: tier queues, per-request output streams, the registry of slots and groups, plan, leader lock."""

from .client import ClusterClient, QueueEntry
from .schema import DEFAULT_PREFIX, GroupRecord, Keys, SlotRecord

__all__ = ["DEFAULT_PREFIX", "ClusterClient", "GroupRecord", "Keys", "QueueEntry", "SlotRecord"]
