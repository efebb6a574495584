"""Tier-aware request scheduler: which queued request goes to which prefill and decode group.

Pure decision code (snapshot in, decisions out): the live router calls `schedule()` on every
tick with what it read from the Redis tier queues and group hashes, the simulator calls it with
its own state, and the tests call it with hand-built snapshots.

One call does three things, in this order:

1. **Admission control.** (A tier's `queue_limit` is enforced where requests arrive, by
   `Tier.has_room`: the gateway answers 429, the simulator sheds the arrival.) If the whole
   cluster is overloaded (the queued prompt tokens would take longer to
   prefill than the most patient tier's TTFT target plus its `max_wait_s`), load is shed from
   the *lowest* tier first (smallest weight), newest first, until the backlog fits. Every shed carries a reason and a
   retry-after hint; nothing is dropped silently.
2. **Ordering.** Deadline-aware across tiers: a request's deadline is `arrival + tier.ttft_s`,
   so an interactive request (0.5 s) naturally goes before a batch one (30 s) that arrived at
   the same time. Requests that already missed their deadline go after those that can still
   make it (serving a lost cause first only makes more requests miss), except that any request
   that has waited `tier.max_wait_s` jumps ahead of everything: a batch request can wait, but
   not forever. At placement the same rule looks ahead: a request that could not finish its
   prefill by its deadline even on the earliest-finishing group (its backlog plus the prompt at
   `prefill_tokens_per_s`) waits for spare capacity, one at a time on a group with nothing
   buffered, so a burst of long prompts cannot push the short ones behind it past theirs.
   `order="fcfs"` and `order="priority"` exist for the baselines and skip that look-ahead.
3. **Placement.** In that order, each request goes to the prefill-capable group (backlog under
   its cap) that would finish its prompt earliest, so long prompts land on wide groups, and to
   the least-loaded decode-capable group that has free KV blocks for the prompt plus
   `max_tokens` and a free batch slot; the tier with the tightest TPOT target prefers
   decode-only groups, whose steps no prefill chunk stretches. A prefill group holds at most
   `max_queued_requests` dispatched requests; the rest wait here, in tier order. The lowest tier
   (smallest weight, when tiers differ in weight) may fill only `background_share` of a decode
   group's batch slots and of a prefill group's window: a flood of background work never leaves
   an interactive request without a place to go at once. With `tpot_guard` set and the group's
   own decode step-time model known, a decode group's batch slots are those its steps can carry
   within `tpot_guard` x the tightest TPOT target of the other tiers (`rows_within`): background
   work cannot slow the decode steps an interactive request shares past its target. Reservations made earlier in the same call count, so one call never
   over-commits a group. A request that fits nowhere stays queued.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.tiers import Tier

ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"
# A colocated group does both phases on one replica (the vLLM-like layout; decode_node/colocated.py
# in the mesh): placement treats it as prefill-capable and decode-capable, independently.
ROLE_COLOCATED = "colocated"


def role_does_prefill(role: str) -> bool:
    return role in (ROLE_PREFILL, ROLE_COLOCATED)


def role_does_decode(role: str) -> bool:
    return role in (ROLE_DECODE, ROLE_COLOCATED)
ORDERS = ("deadline", "priority", "fcfs")
DEFAULT_PREFILL_TOKENS_PER_S = 20000.0  # a group that has not measured itself yet


@dataclass(frozen=True)
class PendingRequest:
    request_id: str
    tier: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class GroupState:
    group_id: str
    role: str  # "prefill" | "decode" | "colocated"
    tp: int
    free_kv_blocks: int
    block_size: int
    running: int
    max_running: int
    queued_tokens: int = 0
    # Prompt tokens a prefill-capable group may hold beyond what it is running; past this the
    # request stays in the router queue, where it can still be reordered or shed.
    max_queued_tokens: int = 16384
    # Prefill speed, to turn a backlog into a wait: what the group measured of itself, else a guess.
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    # Requests a prefill-capable group has been given and not finished handing off, and how many
    # it may have: past that they wait in the router's tier-ordered queue, so a late interactive
    # request is not stuck behind a flood of batch ones already sent down.
    queued_requests: int = 0
    max_queued_requests: int = 1 << 30
    # KV tokens its running sequences hold, and its decode step's seconds for (rows, their KV
    # tokens): the group's own model (measured live, the perf model in the simulator); None: unknown.
    context_tokens: int = 0
    decode_step_s: Callable[[int, int], float] | None = None
    # (TTFT deadline, prompt tokens) of each prompt it holds, when known: with engines that prefill
    # in deadline order (order="deadline"), only those due no later than a request are ahead of it.
    prefill_deadlines: tuple[tuple[float, int], ...] | None = None

    @property
    def does_prefill(self) -> bool:
        return role_does_prefill(self.role)

    @property
    def does_decode(self) -> bool:
        return role_does_decode(self.role)


@dataclass(frozen=True)
class SchedulerSnapshot:
    now_s: float
    tiers: tuple[Tier, ...]
    queued: tuple[PendingRequest, ...]
    groups: tuple[GroupState, ...]
    order: str = "deadline"  # "deadline" | "priority" | "fcfs"
    background_share: float = 0.75  # of a decode group's batch slots, for the lowest tier
    # > 0: a decode group's batch slots for the lowest tier are the rows its steps carry within
    # this share of the tightest TPOT target of the other tiers (0: its max_running, the baselines).
    tpot_guard: float = 0.0


@dataclass(frozen=True)
class Dispatch:
    request_id: str
    prefill_group: str
    decode_group: str


@dataclass(frozen=True)
class Shed:
    request_id: str
    reason: str
    retry_after_s: float


@dataclass(frozen=True)
class Decisions:
    dispatch: tuple[Dispatch, ...]
    shed: tuple[Shed, ...]  # requests in neither stay queued


def schedule(snapshot: SchedulerSnapshot) -> Decisions:
    """Admit, order and place the queued requests of one snapshot."""
    if snapshot.order not in ORDERS:
        raise ValueError(f"order {snapshot.order!r}: use one of {', '.join(ORDERS)}")
    tiers = {t.name: t for t in snapshot.tiers}
    unknown = {q.tier for q in snapshot.queued} - tiers.keys()
    if unknown:
        raise ValueError(f"queued requests name unknown tiers {sorted(unknown)}")
    shed = _admission(snapshot, tiers)
    shed_ids = {s.request_id for s in shed}
    kept = [q for q in snapshot.queued if q.request_id not in shed_ids]
    ordered = _order(kept, tiers, snapshot.now_s, snapshot.order)
    return Decisions(dispatch=_place(ordered, snapshot.groups, tiers, snapshot.now_s, snapshot.order == "deadline",
                                     snapshot.background_share, snapshot.tpot_guard), shed=tuple(shed))


def _admission(snapshot: SchedulerSnapshot, tiers: dict[str, Tier]) -> list[Shed]:
    # A tier's own queue limit is enforced where requests arrive (the gateway; the simulator's
    # arrivals), by `Tier.has_room`: what reaches here is within it.
    by_tier: dict[str, list[PendingRequest]] = {}
    for q in snapshot.queued:
        by_tier.setdefault(q.tier, []).append(q)
    return _shed_overload(snapshot, tiers, by_tier)


def _arrival(q: PendingRequest) -> float:
    return q.arrival_s


def _shed_overload(snapshot: SchedulerSnapshot, tiers: dict[str, Tier],
                   survivors: dict[str, list[PendingRequest]]) -> list[Shed]:
    """Shed lowest-weight tiers first, newest first, until the prefill backlog fits."""
    rate = sum(g.prefill_tokens_per_s for g in snapshot.groups if g.does_prefill)
    if rate <= 0 or not survivors:
        return []
    backlog = sum(g.queued_tokens for g in snapshot.groups if g.does_prefill)
    backlog += sum(q.prompt_tokens for reqs in survivors.values() for q in reqs)
    # Backlog that would make even the most patient tier wait beyond its own TTFT + max wait
    # cannot be served in time by anyone; keep only what the cluster can clear.
    budget = rate * max(t.ttft_s + t.max_wait_s for t in tiers.values())
    if backlog <= budget:
        return []
    shed: list[Shed] = []
    for name in sorted(survivors, key=lambda n: (tiers[n].weight, tiers[n].ttft_s)):
        for q in sorted(survivors[name], key=_arrival, reverse=True):
            if backlog <= budget:
                return shed
            backlog -= q.prompt_tokens
            shed.append(Shed(q.request_id, f"cluster overloaded: {backlog / rate:.1f} s of prefill "
                             f"backlog; tier {name} is the lowest tier queued",
                             retry_after_s=math.ceil(backlog / rate)))
    return shed


def _order(reqs: list[PendingRequest], tiers: dict[str, Tier], now_s: float,
           order: str) -> list[PendingRequest]:
    if order == "fcfs":
        return sorted(reqs, key=lambda q: q.arrival_s)
    if order == "priority":
        rank = {n: i for i, n in enumerate(sorted(tiers, key=lambda n: -tiers[n].weight))}
        return sorted(reqs, key=lambda q: (rank[q.tier], q.arrival_s))

    def key(q: PendingRequest) -> tuple[int, float]:
        tier = tiers[q.tier]
        if now_s - q.arrival_s >= tier.max_wait_s:
            return (0, q.arrival_s)  # starved: oldest first, ahead of everything
        deadline = q.arrival_s + tier.ttft_s
        return (1 if deadline >= now_s else 2, deadline)

    return sorted(reqs, key=key)


@dataclass
class _Load:
    """What one call has committed so far, per group (so it never over-commits one)."""

    prefill: dict[str, int]  # prompt tokens held by each prefill-capable group
    slots_left: dict[str, int]  # places left in each prefill group's window
    kv: dict[str, int]  # free KV blocks of each decode-capable group
    running: dict[str, int]
    block: dict[str, int]
    ahead: dict[str, list[tuple[float, int]]]  # (TTFT deadline, tokens) held, for deadline-ordered engines
    out: list[Dispatch]

    def backlog(self, g: str, deadline: float) -> int:
        """Prompt tokens group `g` prefills before one due at `deadline`."""
        return sum(t for d, t in self.ahead[g] if d <= deadline) if g in self.ahead else self.prefill[g]

    def commit(self, q: PendingRequest, pre: str, dec: str, deadline: float) -> None:
        self.prefill[pre] += q.prompt_tokens
        self.slots_left[pre] -= 1
        self.kv[dec] -= _blocks(q, self.block[dec])
        self.running[dec] += 1
        if pre in self.ahead:
            self.ahead[pre].append((deadline, q.prompt_tokens))
        self.out.append(Dispatch(q.request_id, pre, dec))


def _place(ordered: list[PendingRequest], groups: tuple[GroupState, ...], tiers: dict[str, Tier],
           now_s: float, defer_late: bool, background_share: float = 1.0,
           tpot_guard: float = 0.0) -> tuple[Dispatch, ...]:
    pg = [g for g in groups if g.does_prefill]
    load = _Load({g.group_id: g.queued_tokens for g in pg},
                 {g.group_id: g.max_queued_requests - g.queued_requests for g in pg},
                 {g.group_id: g.free_kv_blocks for g in groups if g.does_decode},
                 {g.group_id: g.running for g in groups if g.does_decode}, {g.group_id: g.block_size for g in groups},
                 # With deadline-ordered engines, what is ahead of a request is what is due before it.
                 {g.group_id: list(g.prefill_deadlines) for g in pg if defer_late and g.prefill_deadlines is not None},
                 [])
    prefill, slots_left = load.prefill, load.slots_left
    cap = {g.group_id: g.max_queued_tokens for g in pg}
    # What the lowest tier must leave of each prefill group's window (see background_share).
    kept_back = {g.group_id: g.max_queued_requests - max(1, int(g.max_queued_requests * background_share)) for g in pg}
    rate = {g.group_id: max(g.prefill_tokens_per_s, 1e-9) for g in groups}
    tp = {g.group_id: g.tp for g in groups}
    max_running = {g.group_id: g.max_running for g in groups}
    decode_only = {g.group_id for g in groups if g.role == ROLE_DECODE}
    tightest = min((t.tpot_s for t in tiers.values()), default=0.0)
    weights = {t.weight for t in tiers.values()}
    lowest = {n for n, t in tiers.items() if t.weight == min(weights)} if len(weights) > 1 else set()
    background_slots = _background_slots(groups, tiers, lowest, ordered, background_share, tpot_guard)
    late: list[tuple[PendingRequest, str]] = []
    for q in ordered:
        if not any(prefill[g] < cap[g] and slots_left[g] > 0 for g in prefill):
            break  # every prefill group is full: nobody else can go this tick
        # The tightest-TPOT tier goes to decode-only groups first: no prefill chunk ever
        # stretches their steps.
        tier = tiers[q.tier]
        prefer_pure = tier.tpot_s <= tightest and bool(decode_only)
        background = q.tier in lowest
        dec = _pick_decode(q, load.kv, load.running, background_slots if background else max_running, load.block, tp,
                           decode_only if prefer_pure else set())
        if dec is None:
            continue  # a smaller request may still fit
        window = {g: n - kept_back[g] for g, n in slots_left.items()} if background else slots_left
        deadline = q.arrival_s + tier.ttft_s
        pre = _pick_prefill(q, {g: load.backlog(g, deadline) for g in prefill}, prefill, cap, rate, window, prefer=dec)
        if pre is None:
            if background:
                continue  # the windows' last places are kept for the higher tiers
            break
        # A request that cannot make its TTFT even on the earliest-finishing group would only
        # push requests that still can past theirs: it waits for spare capacity (below).
        finish = now_s + (load.backlog(pre, deadline) + q.prompt_tokens) / rate[pre]
        if defer_late and finish > deadline and now_s - q.arrival_s < tier.max_wait_s:
            late.append((q, dec))
            continue
        load.commit(q, pre, dec, deadline)
    for q, dec in late:
        # Spare capacity only: a group with nothing buffered takes one late request.
        idle = [g for g in prefill if prefill[g] == 0 and slots_left[g] > 0]
        limit = background_slots if q.tier in lowest else max_running
        if not idle or load.kv[dec] < _blocks(q, load.block[dec]) or load.running[dec] >= limit[dec]:
            continue
        pre = min(idle, key=lambda g: (q.prompt_tokens / rate[g], g))
        load.commit(q, pre, dec, q.arrival_s + tiers[q.tier].ttft_s)
    return tuple(load.out)


def rows_within(step_s: Callable[[int, int], float], limit_s: float, context_per_row: float, max_rows: int) -> int:
    """The most decode rows (up to `max_rows`) whose step, each row holding `context_per_row` KV
    tokens, takes at most `limit_s` by the group's step-time model (monotone in rows: bisection)."""
    lo, hi = 0, max_rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if step_s(mid, int(mid * context_per_row)) <= limit_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _background_slots(groups: Sequence[GroupState], tiers: dict[str, Tier], lowest: set[str],
                      ordered: Sequence[PendingRequest], share: float, tpot_guard: float) -> dict[str, int]:
    """Batch places per group the lowest tier may fill: `share` of its max_running, or with the TPOT
    guard of the rows its steps carry within the other tiers' tightest TPOT target."""
    others = [t.tpot_s for n, t in tiers.items() if n not in lowest]
    waiting = [q.prompt_tokens + q.max_tokens / 2 for q in ordered if q.tier in lowest]
    slots = {}
    for g in groups:
        rows = g.max_running
        if tpot_guard > 0 and others and g.decode_step_s is not None and g.does_decode:
            per_row = g.context_tokens / g.running if g.running else (sum(waiting) / len(waiting) if waiting else 0.0)
            rows = rows_within(g.decode_step_s, tpot_guard * min(others), per_row, g.max_running)
        slots[g.group_id] = max(1, int(rows * share))
    return slots


def _blocks(q: PendingRequest, block_size: int) -> int:
    return -(-(q.prompt_tokens + q.max_tokens) // block_size)


def _pick_prefill(q: PendingRequest, ahead: dict[str, int], prefill: dict[str, int], cap: dict[str, int],
                  rate: dict[str, float], slots_left: dict[str, int], prefer: str) -> str | None:
    """Earliest estimated prefill finish (behind the `ahead` tokens): a long prompt goes to a wide
    group even if it is busier. A colocated decode group gets a small edge for its own requests
    (no KV transfer needed)."""
    open_groups = [g for g in prefill if prefill[g] < cap[g] and slots_left[g] > 0]
    if not open_groups:
        return None
    return min(open_groups, key=lambda g: ((ahead[g] + q.prompt_tokens) / rate[g] * (0.95 if g == prefer else 1.0), g))


def decode_group_for(q: PendingRequest, groups: Sequence[GroupState], preferred: set[str]) -> str | None:
    """The decode group for `q` among `groups` by the placement rule (`_pick_decode`): what a prefill
    group uses to fail a hand-off over to another decode group (prefill_node/handoff.py)."""
    decode = [g for g in groups if g.does_decode]
    return _pick_decode(q, {g.group_id: g.free_kv_blocks for g in decode}, {g.group_id: g.running for g in decode},
                        {g.group_id: g.max_running for g in decode}, {g.group_id: g.block_size for g in decode},
                        {g.group_id: g.tp for g in decode}, preferred)


def _pick_decode(q: PendingRequest, kv: dict[str, int], running: dict[str, int], max_running: dict[str, int],
                 block: dict[str, int], tp: dict[str, int], preferred: set[str]) -> str | None:
    """A group with free KV blocks for the prompt and `max_tokens` and a free batch slot: preferred
    groups first, then the fewest running sequences per TP rank (the lowest TPOT)."""
    fits = [g for g in kv if running[g] < max_running[g] and kv[g] >= _blocks(q, block[g])]
    # Preferred groups first, then fewest running sequences per TP rank (lowest TPOT).
    return min(fits, key=lambda g: (g not in preferred, running[g] / tp[g], g)) if fits else None
