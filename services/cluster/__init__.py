"""Redis: tier queues, per-request output streams, the in-flight ledger, the registry of slots and
groups, the plan document, the leader lock."""

from .client import ClusterClient, QueueEntry
from .schema import DEFAULT_PREFIX, GroupRecord, Keys, PlanDoc, SlotRecord

__all__ = ["DEFAULT_PREFIX", "ClusterClient", "GroupRecord", "Keys", "PlanDoc", "QueueEntry", "SlotRecord"]
