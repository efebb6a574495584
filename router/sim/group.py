"""One simulated group: a TP replica running prefill chunks and/or continuous-batching decode.

Lifecycle of an iteration: `start()` takes the pending decode joins, then either runs one forward
that carries a prefill chunk (plus one decode token for every running sequence, if the group
decodes), or, with no prefill work, a *macro step*: k identical decode steps up to the next
sequence that finishes (capped), scheduled as one event. Anything that changes the batch
mid-way (a sequence joining, a prompt arriving) calls `interrupt()`, which cuts the macro step
at the next step boundary, exactly as a real engine would admit it. That keeps the event count
near the number of joins and finishes, not the number of decode steps.

The engine's policies are switchable per group, and each is the engine's own function from
services/engine/policy.py (the engine's scheduler calls the same ones, so the simulator credits a
group with nothing the engine lacks): the *TPOT guard* sizes each prefill chunk in a group that
also decodes so that the forward takes at most `tpot_guard` x the tightest TPOT target among the
sequences decoding there (Sarathi-Serve sizes its token budget from the TBT SLO; this does it per
step, from the tiers actually decoding), the *step cap* keeps any forward carrying prompt tokens
within `max_step_s` (a quarter of the tightest TTFT target, as `nitsum up` runs the engines), and
*deadline-aware prefill* orders the buffered prompts by TTFT deadline, those that can still make
it first (vLLM serves its waiting queue in order). Nitsum's groups get all three, the vLLM-like
baseline none. Not modelled: preemption (the simulator reserves a request's KV at dispatch, so
a group never runs out of blocks mid-way).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import services.engine.policy as policy
from router.decide.perfmodel import PerfModel
from router.decide.plans import Group
from services.engine.policy import SLO, Waiting

MAX_MACRO_STEPS = 128  # re-evaluate the step time at least this often as contexts grow


@dataclass
class Join:
    rid: int
    remaining: int  # decode steps still to run
    context: int  # KV tokens it holds now


@dataclass
class SimGroup:
    gid: str
    group: Group
    perf: PerfModel
    kv_blocks: int
    block_size: int
    max_running: int
    chunk_tokens: int
    schedule_event: Callable[[float, str, object], None]
    paused_until: float = 0.0
    # TPOT guard: a forward that carries a prefill chunk may take at most this share of the
    # tightest TPOT target among the sequences decoding here (0 = off: vLLM's fixed budget).
    tpot_guard: float = 0.0
    tpot_of: Sequence[float] = ()  # request id -> its tier's TPOT target
    min_chunk: int = 256  # a chunk never shrinks below this, so prefill always progresses
    max_step_s: float = math.inf  # a forward carrying prompt tokens fits this (policy.step_cap_s)
    # Deadline-aware engine: each chunk serves the most urgent prompt that can still make its
    # TTFT (request id -> arrival + TTFT target); empty = FIFO, as vLLM does.
    deadline_of: Sequence[float] = ()
    alive: bool = True
    free_blocks: int = 0
    reserved: int = 0  # sequences holding a KV reservation here (dispatched, not finished)
    queued_tokens: int = 0
    prefill_q: deque[list[int]] = field(default_factory=deque)  # [rid, prompt, done]
    pending: list[Join] = field(default_factory=list)
    step: int = 0
    decoding: list[tuple[int, int]] = field(default_factory=list)  # heap of (finish_step, rid)
    ctx_of: dict[int, int] = field(default_factory=dict)  # rid -> context minus join step
    ctx_base: int = 0
    targets: Counter[float] = field(default_factory=Counter)  # TPOT targets of the decoding sequences
    busy: bool = False
    version: int = 0
    it_start: float = 0.0
    it_dt: float = 0.0
    it_steps: int = 0
    it_prefilled: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free_blocks = self.kv_blocks
        self.prefill_rate = 2048 / self.perf.prefill_time(2048, self.tp)  # tokens/s, nominal

    @property
    def tp(self) -> int:
        return self.group.tp

    @property
    def role(self) -> str:
        return self.group.role

    @property
    def context(self) -> int:
        return self.ctx_base + len(self.decoding) * self.step

    def start(self, now: float, finish: Callable[[int, float], None]) -> None:
        """Begin the next iteration if idle and not paused."""
        if self.busy or not self.alive or now < self.paused_until:
            return
        for j in self.pending:
            if j.remaining <= 0:
                finish(j.rid, now)
                continue
            heapq.heappush(self.decoding, (self.step + j.remaining, j.rid))
            if self.tpot_guard:
                self.targets[self.tpot_of[j.rid]] += 1
            self.ctx_of[j.rid] = j.context - self.step
            self.ctx_base += j.context - self.step
        self.pending.clear()
        if self.group.does_prefill and self.prefill_q:
            self._start_chunk(now)
        elif self.decoding:
            self._start_macro(now)

    def _start_chunk(self, now: float) -> None:
        budget = self.chunk_tokens - len(self.decoding)
        decoding = self.tpot_guard and self.decoding and self.group.does_decode
        if decoding or math.isfinite(self.max_step_s):
            n, ctx = (len(self.decoding), self.context) if decoding else (0, 0)
            budget = min(budget, policy.guarded_prefill_tokens(
                self.chunk_tokens, n, min(self.targets) if decoding else math.inf,
                lambda c: self.perf.step_time(c, n, ctx, self.tp), self.tpot_guard, self.min_chunk,
                max_step_s=self.max_step_s))
        if self.deadline_of and len(self.prefill_q) > 1:
            self._prioritize(now)
        tokens, sq = 0, 0.0
        self.it_prefilled = []
        while self.prefill_q and tokens < budget:
            item = self.prefill_q[0]
            take = min(item[1] - item[2], budget - tokens)
            sq += take * (2 * item[2] + take)  # causal attention of a chunk over its prefix
            item[2] += take
            tokens += take
            self.queued_tokens -= take
            if item[2] >= item[1]:
                self.it_prefilled.append(item[0])
                self.prefill_q.popleft()
        dt = self.perf.step_time(tokens, len(self.decoding), self.context, self.tp, sq)
        self._begin(now, dt, 1)

    def _prioritize(self, now: float) -> None:
        """Earliest deadline first among prompts that can still make it, then the rest: the engine's
        own policy (services/engine/policy.py), on the simulated queue."""
        self.prefill_q = deque(policy.prefill_order(self.prefill_q, self._waiting, now, self.prefill_rate))

    def _waiting(self, item: list[int]) -> Waiting:
        return Waiting(SLO(deadline_s=self.deadline_of[item[0]]), item[1] - item[2], item[0])

    def _start_macro(self, now: float) -> None:
        k = min(MAX_MACRO_STEPS, self.decoding[0][0] - self.step)
        n = len(self.decoding)
        dt = self.perf.decode_step_time(n, self.context + n * k // 2, self.tp)
        self.it_prefilled = []
        self._begin(now, dt, k)

    def _begin(self, now: float, dt: float, steps: int) -> None:
        self.busy, self.it_start, self.it_dt, self.it_steps = True, now, dt, steps
        self.version += 1
        self.schedule_event(now + dt * steps, "iter", (self.gid, self.version))

    def interrupt(self, now: float) -> None:
        """Cut a running macro step at the next step boundary so new work can join."""
        if not self.busy or self.it_steps <= 1:
            return
        steps = int((now - self.it_start) / self.it_dt) + 1
        if steps < self.it_steps:
            self.it_steps = steps
            self.version += 1
            self.schedule_event(self.it_start + self.it_dt * steps, "iter", (self.gid, self.version))

    def end(self, now: float, finish: Callable[[int, float], None]) -> list[int]:
        """Close the iteration: advance decode, finish sequences; returns rids whose prefill ended."""
        self.busy = False
        if self.group.does_decode and self.decoding:
            self._advance(self.it_steps, finish, now)
        done, self.it_prefilled = self.it_prefilled, []
        return done

    def _advance(self, steps: int, finish: Callable[[int, float], None], now: float) -> None:
        start_step = self.step
        self.step += steps
        while self.decoding and self.decoding[0][0] <= self.step:
            fs, rid = heapq.heappop(self.decoding)
            self.ctx_base -= self.ctx_of.pop(rid)
            if self.tpot_guard:
                self._drop_target(rid)
            # Within a cut macro step a sequence ends at its own step boundary.
            finish(rid, min(now, self.it_start + (fs - start_step) * self.it_dt))

    def evacuate(self, now: float, finish: Callable[[int, float], None]) -> tuple[list[Join], list[int]]:
        """Stop for a reconfiguration: (running sequences to migrate, rids whose prefill must rerun)."""
        if self.busy and self.it_steps > 1:
            done = min(self.it_steps, int((now - self.it_start) / self.it_dt))
            self._advance(done, finish, now)
        elif self.busy:
            for item in self.prefill_q:  # the chunk in flight is lost; redo it elsewhere
                item[2] = 0
            self.prefill_q.extendleft(reversed([[rid, 0, 0] for rid in self.it_prefilled]))
        self.alive, self.busy = False, False
        self.version += 1
        moving = [Join(rid, fs - self.step, self.ctx_of[rid] + self.step) for fs, rid in self.decoding]
        moving += self.pending
        requeue = [item[0] for item in self.prefill_q]
        self.decoding, self.pending, self.prefill_q = [], [], deque()
        self.targets.clear()
        return moving, requeue

    def _drop_target(self, rid: int) -> None:
        t = self.tpot_of[rid]
        self.targets[t] -= 1
        if not self.targets[t]:
            del self.targets[t]
