"""The one engine for every change to a cluster.

A plan has a kind, the facts it was planned on and an ordered list of steps.
Each kind of operation registers a factory here that turns a stored plan into
steps; every step has a precondition checked against the live cluster right
before it runs, an action and a verification. The engine does the rest, once
for every kind: it persists each step's start and outcome before the next
begins, stops on the first failure, audits, reports through the Notifier,
and resumes a stopped plan at the step it stopped on, after re-running step
0's precondition (the full re-check) first. Every action is idempotent (it
looks before it changes), so repeating the interrupted step is safe.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, cast

from bot.domain.errors import EtcdError, FactsChanged, PlanCancelled, StepFailed
from bot.domain.mrkdwn import code, escape
from bot.domain.plan import Fence, PlanKind, PlanState, Stage
from bot.domain.record import AnyPlan, PlanRecord
from bot.ops.access import Access, Role
from bot.ops.context import BotContext
from bot.ops.launcher import Fencing
from bot.output.blocks import PlanMessage, PlanView
from bot.store.base import LeaseLost, StoreError

if TYPE_CHECKING:
    from bot.config import ClusterConfig, Config
    from bot.etcd.client import EtcdClient

P = TypeVar("P", bound=AnyPlan)

log = logging.getLogger(__name__)
POLL = 0.5             # seconds between two looks at what a person was asked to do
REMIND_BEFORE = 60.0   # a wait on a person says so once more when this much of it is left
# The fence of the run this task executes: set by execute(), read by an operation's own writes (update_plan).
RUN_FENCE: ContextVar[Fence | None] = ContextVar("run_fence", default=None)


@dataclass(frozen=True)
class StepRun:
    """One step as the engine runs it. `precondition` returns what it found to
    hold (or raises FactsChanged); `action` returns what it did, and is skipped
    (the precondition's finding is the step's result) when None; `verify`
    confirms the action's effect and returns the detail to record."""

    key: str
    precondition: Callable[[], Awaitable[str]] | None = None
    action: Callable[[], Awaitable[str]] | None = None
    verify: Callable[[str], Awaitable[str]] | None = None


class Operation(Protocol):
    """A kind of plan, ready to run: its steps in plan order, and what to say at the end."""

    def steps(self) -> Sequence[StepRun]: ...

    def done_note(self) -> str: ...


class ClusterOperation(Generic[P]):
    """What every kind of operation starts from: its plan (of the kind's own type),
    the configured cluster it changes and that cluster's client."""

    plan_type: ClassVar[type[AnyPlan]]   # the kind's plan (P itself: a class variable cannot name P)
    what: str                       # "a replacement": says which kind a wrong record was

    def __init__(self, ctx: BotContext, record: PlanRecord, actor: str, started: set[str]):
        if not isinstance(record.plan, self.plan_type):
            raise StepFailed(f"plan {record.id} is not {self.what}", "see /etcd plans")
        self.ctx, self.record, self.actor, self.started = ctx, record, actor, started
        self.plan: P = cast(P, record.plan)
        cluster = ctx.config.cluster(record.cluster)
        if cluster is None:
            raise StepFailed(f"cluster {record.cluster} is no longer in the configuration", "restore its config")
        self.cluster: ClusterConfig = cluster
        self.client: EtcdClient = ctx.client(cluster)
        self.fence = RUN_FENCE.get()  # the operation's own plan writes are fenced like the engine's
        # ... and so is every launcher process it starts (the lease checked right before each one)
        self.fencing = None if self.fence is None else Fencing(self.fence.token, partial(hold_lease, ctx, self.fence))

    def steps(self) -> Sequence[StepRun]:
        raise NotImplementedError

    def done_note(self) -> str:
        raise NotImplementedError

    async def wait_for_person(self, key: str, ask: str, ready: Callable[[Stage | None], Awaitable[str | None]],
                              timed_out: StepFailed) -> str:
        """The `manual` launcher's wait at stage `key`: `ask` (mrkdwn) is posted with until when the plan waits;
        `ready` is asked every POLL until it says what happened (retried through etcd errors); a reminder goes
        out when a minute is left. An approver's `/etcd cancel` ends the wait (PlanCancelled: the plan is
        cancelled already); so does the launcher's timeout (`timed_out`), unless `ready` says otherwise then."""
        store, plan_id = self.ctx.store, self.record.id
        seconds = self.cluster.launcher.timeout_seconds
        await store.open_stage(plan_id, key, fence=self.fence)  # before the ask: nothing is confirmed early
        deadline = time.monotonic() + seconds
        cancel = code(f"/etcd cancel {plan_id} <reason>")
        await note(self.ctx, self.record, f"{ask}\n:hourglass_flowing_sand: The plan waits until "
                                          f"{_clock(time.time() + seconds)} ({_span(seconds)}); an approver can "
                                          f"stop it here with {cancel}.")
        reminded = seconds <= REMIND_BEFORE  # a wait this short says until when once, and that is enough
        stage: Stage | None = None
        try:
            while True:
                stage = await store.stage(plan_id, key)
                if stage is not None and stage.closed_at is not None and not stage.confirmed_by:
                    current = await store.plan(plan_id)
                    raise PlanCancelled(key, (current.decided_by if current else None) or "an approver",
                                        (current.error if current else None) or "")
                try:
                    if (found := await ready(stage)) is not None:
                        return found
                except EtcdError:
                    pass  # a member starting, or not yet answering: the next look
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if not reminded and left <= REMIND_BEFORE:
                    reminded = True
                    await note(self.ctx, self.record,
                               f":hourglass: {_span(left)} left at stage *{escape(key)}* of plan {plan_id} (until "
                               f"{_clock(time.time() + left)}); then it fails and can be resumed. To stop it "
                               f"instead: {cancel}.")
                await asyncio.sleep(min(POLL, left))
        finally:
            ended = await store.close_stage(plan_id, key, fence=self.fence)
        if ended is not None and (found := await ready(ended)) is not None:  # an answer that raced the end counts
            return found
        raise timed_out


def _clock(epoch: float) -> str:
    """A moment as people in any time zone read it in a thread or a terminal."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))


def _span(seconds: float) -> str:
    whole = max(0, round(seconds))
    return f"{whole // 60} min {whole % 60:02d} s" if whole >= 60 else f"{whole} s"


async def hold_lease(ctx: BotContext, fence: Fence) -> None:
    """Right before an action: LeaseLost unless this replica still leads the tenure `fence` names, by the
    lease as the store has it, not as this replica last renewed it (a renewal runs every ttl/3: another
    replica may hold the lease since)."""
    if ctx.leadership.fence != fence:
        raise LeaseLost(fence)
    held = await ctx.store.lease(fence.name)
    if held is None or (held.holder, held.token) != (fence.holder, fence.token):
        ctx.leadership.lost()
        raise LeaseLost(fence)


# (context, record, actor, keys of the steps already started before this run) -> Operation
OperationFactory = Callable[[BotContext, PlanRecord, str, set[str]], Operation]
# A plan of the kind and its progress -> its message (bot.output.blocks)
Render = Callable[[Any, PlanView], PlanMessage]


@dataclass(frozen=True)
class Kind:
    """A kind of plan, declared once, on its operation (`register`): the plan type it runs, how it runs,
    and how its message reads. bot.ops.kinds imports every operation, so the table is whole."""

    kind: PlanKind
    plan_type: type[AnyPlan]
    operation: OperationFactory
    render: Render


KINDS: dict[PlanKind, Kind] = {}
C = TypeVar("C", bound=ClusterOperation[Any])


def register(kind: PlanKind, *, render: Render) -> Callable[[type[C]], type[C]]:
    def add(operation: type[C]) -> type[C]:
        KINDS[kind] = Kind(kind, operation.plan_type, operation, render)
        return operation
    return add


def render_plan(record: PlanRecord, view: PlanView) -> PlanMessage:
    """The message of a plan of any kind, as its kind renders it."""
    return KINDS[record.kind].render(record.plan, view)


def plan_view(config: Config, record: PlanRecord, step_states: Mapping[int, str]) -> PlanView:
    """What a plan's message shows besides the plan: its state and progress, who approves and how."""
    cluster = config.cluster(record.cluster)
    approvers = Access.holders(cluster, Role.APPROVER) if cluster else "nobody (cluster not configured)"
    approval = config.approval
    return PlanView(state=record.state, proposer=record.proposer, approvers=approvers, expires_at=record.expires_at,
                    reaction=approval.reaction, reject_reaction=approval.reject_reaction, step_states=step_states,
                    decided_by=record.decided_by, error=record.error, approvals=record.approvals,
                    approvals_needed=approval.rule(record.kind).approvals_needed, decided_at=record.decided_at)


async def refresh(ctx: BotContext, plan_id: str) -> None:
    """Re-render the plan's message from the store (the single source of truth)."""
    record = await ctx.store.plan(plan_id)
    if record is not None:
        states = {s.idx: s.state for s in await ctx.store.steps(plan_id)}
        await ctx.notifier.plan_changed(record, states)


async def note(ctx: BotContext, record: PlanRecord, text: str) -> None:
    await ctx.notifier.thread_note(record, text)


def start_plan(ctx: BotContext, plan_id: str, actor: str, *, from_states: Iterable[PlanState],
               start: int) -> asyncio.Task[PlanState | None] | None:
    """Run the plan in the background if this replica is the leader and does not
    run it already (its task); otherwise the leader picks it up (lifecycle.pick_up)."""
    if not ctx.is_leader() or plan_id in ctx.running:
        return None
    ctx.running.add(plan_id)
    task = ctx.spawn(execute(ctx, plan_id, actor, from_states=from_states, start=start), name=f"plan-{plan_id}")
    task.add_done_callback(lambda _: ctx.running.discard(plan_id))
    return task


async def execute(ctx: BotContext, plan_id: str, actor: str, *, from_states: Iterable[PlanState],
                  start: int) -> PlanState | None:
    """Take the plan to `running` (guarded: one caller wins) and run it from
    step `start`; returns its final state, or None when another caller won or
    this replica lost the lease on the way."""
    fence = ctx.leadership.fence
    if fence is None:
        return None
    RUN_FENCE.set(fence)
    try:
        if not await ctx.store.transition(plan_id, from_states, PlanState.RUNNING, error=None, fence=fence):
            return None
        record = await ctx.store.plan(plan_id)
        assert record is not None  # the transition just found it
        started = {s.key for s in await ctx.store.steps(plan_id)}
        try:
            operation = KINDS[record.kind].operation(ctx, record, actor, started)
        except StepFailed as e:
            await ctx.store.transition(plan_id, [PlanState.RUNNING], PlanState.FAILED, error=e.reason,
                                       finished_at=time.time(), fence=fence)
            await note(ctx, record, f":x: Plan {plan_id} cannot run: {escape(e.reason)}")
            return PlanState.FAILED
        return await Run(ctx, record, actor, operation, started, fence).run(start)
    except LeaseLost as e:
        log.warning("plan left to the new leader: this replica lost the lease",
                    extra={"ctx_plan": plan_id, "ctx_error": str(e)})
        return None
    except StoreError as e:
        # The run cannot record its progress. Left as it is, the plan would stay running with this replica still
        # leading, and a leader takes plans over only when a tenure begins: so it steps down, and its next renewal
        # (or another replica) begins one and takes the plan over, re-checking the step in flight.
        ctx.leadership.lost()
        log.warning("plan left running and this replica stepped down: the store failed during the run",
                    extra={"ctx_plan": plan_id, "ctx_error": str(e)})
        return None


class Run:
    def __init__(self, ctx: BotContext, record: PlanRecord, actor: str, operation: Operation, started: set[str],
                 fence: Fence):
        self.ctx, self.record, self.actor, self.operation, self.started = ctx, record, actor, operation, started
        self.fence = fence
        self.steps = operation.steps()

    async def run(self, start: int) -> PlanState:
        store, record, plan, fence = self.ctx.store, self.record, self.record.plan, self.fence
        recheck = self.steps[0].precondition
        if start > 0 and recheck is not None:  # resume: step 0's re-check first, against the plan's progress
            try:
                await recheck()
            except (TimeoutError, StepFailed, EtcdError) as e:
                return await self._fail(start, self._failure(e), before=True)
        for idx in range(start, len(self.steps)):
            step = self.steps[idx]
            self._still_leading()
            await store.step_started(record.id, idx, step.key, fence=fence)
            await refresh(self.ctx, record.id)
            began = time.monotonic()
            try:
                found = await step.precondition() if step.precondition else ""
            except (TimeoutError, StepFailed, EtcdError) as e:
                return await self._fail(idx, self._failure(e), before=True)
            await self._still_holding()  # announcing and checking take time: deposed meanwhile, no action is sent
            try:
                detail = await step.action() if step.action else found
                if step.verify:
                    detail = await step.verify(detail)
            except (TimeoutError, StepFailed, EtcdError) as e:
                return await self._fail(idx, self._failure(e))
            except PlanCancelled as e:
                return await self._cancelled(idx, e)
            except (asyncio.CancelledError, LeaseLost):
                raise  # the bot is stopping, or another replica leads: the plan stays "running" for the next leader
            except Exception as e:
                log.exception("step crashed", extra={"ctx_plan": record.id, "ctx_step": step.key})
                return await self._fail(idx, StepFailed(f"internal error in step {step.key}: {type(e).__name__}",
                                                        "see the bot's log; then /etcd resume the plan"))
            self.started.add(step.key)
            await store.step_finished(record.id, idx, "done", detail, fence=fence)
            await store.audit("step_done", user=self.actor, channel=record.channel, cluster=record.cluster,
                              detail={"plan": record.id, "step": step.key, "detail": detail,
                                      "seconds": round(time.monotonic() - began, 3),
                                      "replica": self.ctx.leadership.replica_id})
            await note(self.ctx, record, f":white_check_mark: Step {idx} ({step.key}): {escape(detail)}")
        await store.transition(record.id, [PlanState.RUNNING], PlanState.DONE, finished_at=time.time(), fence=fence)
        await store.audit("plan_done", user=self.actor, channel=record.channel, cluster=record.cluster,
                          detail={"plan": record.id})
        await refresh(self.ctx, record.id)
        await note(self.ctx, record, f":tada: Plan {plan.id} is done: {self.operation.done_note()}")
        return PlanState.DONE

    def _still_leading(self) -> None:
        """Deposed, or leading a later tenure than the one this run started in: stop here, the plan stays
        `running`, and the leader of the current tenure resumes it (re-checking this step first)."""
        if self.ctx.leadership.fence != self.fence:
            raise LeaseLost(self.fence)

    async def _still_holding(self) -> None:
        """Right before a step's action (one store read per step; each launcher process checks again)."""
        await hold_lease(self.ctx, self.fence)

    @staticmethod
    def _failure(e: Exception) -> StepFailed:
        if isinstance(e, StepFailed):
            return e
        return StepFailed(str(e) or type(e).__name__,
                          "check /etcd status, then /etcd resume the plan or finish by hand")

    async def _cancelled(self, idx: int, e: PlanCancelled) -> PlanState:
        """Stopped at a person's stage by /etcd cancel, which moved the plan to cancelled and said what had run:
        the step that waited is recorded as cancelled, and nothing more runs."""
        await self.ctx.store.step_finished(self.record.id, idx, "cancelled", error=e.reason, fence=self.fence)
        await refresh(self.ctx, self.record.id)
        return PlanState.CANCELLED

    async def _fail(self, idx: int, e: StepFailed, before: bool = False) -> PlanState:
        store, record = self.ctx.store, self.record
        key = self.steps[idx].key
        message = f"before step {idx} ({key}): {e.reason}" if before else f"step {idx} ({key}) failed: {e.reason}"
        await store.step_finished(record.id, idx, "failed", error=e.reason, fence=self.fence)
        await store.transition(record.id, [PlanState.RUNNING], PlanState.FAILED, error=message, finished_at=time.time(),
                               fence=self.fence)
        await store.audit("step_failed", user=self.actor, channel=record.channel, cluster=record.cluster,
                          detail={"plan": record.id, "step": key, "error": e.reason, "precondition": before})
        await refresh(self.ctx, record.id)
        stopped = f":x: Plan {record.id} stopped{' ' if before else ': '}{escape(message)}"
        if isinstance(e, FactsChanged):  # one line: what changed, and that a new plan is needed
            await note(self.ctx, record, f"{stopped}; {escape(e.next_action)}.")
        else:
            await note(self.ctx, record, f"{stopped}\nNext: {escape(e.next_action)}")
        return PlanState.FAILED

