"""Demo data: a simulated week of agents working through tasks, driven through the real service with
a simulated clock, so every chart and dashboard has something to show."""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from api.core.domain import Completion, TaskPriority, TaskSpec, TaskStatus
from api.core.service import TaskService
from api.core.validation import task_spec
from api.runtime import runtime
from api.settings import Settings

TICK = 15.0  # seconds of simulated time per step; every timestamp falls on this grid
LEASE = 900
HEADROOM = 1.6  # capacity over the average load: queues build at daytime peaks and drain at night


@dataclass(frozen=True)
class Directory:
    path: str
    share: float
    median_run: float  # seconds
    failure: float  # chance that an attempt fails


DIRECTORIES = (
    Directory("/srv/api", 0.30, 240, 0.06),
    Directory("/srv/web", 0.25, 180, 0.05),
    Directory("/srv/data-pipeline", 0.20, 720, 0.12),
    Directory("/srv/infra", 0.15, 360, 0.09),
    Directory("/srv/docs", 0.10, 120, 0.02),
)
TAGS = {
    "bug": 5,
    "feature": 4,
    "refactor": 2,
    "tests": 3,
    "docs": 1,
    "security": 1,
    "deps": 1,
    "flaky": 1,
}
PRIORITIES = {TaskPriority.HIGH: 2, TaskPriority.MEDIUM: 6, TaskPriority.LOW: 2}
PROMPTS = (
    "Fix the failing test in {area}",
    "Add input validation to {area}",
    "Refactor {area} to remove duplication",
    "Investigate the timeout reported in {area}",
    "Update the dependencies of {area}",
    "Write documentation for {area}",
    "Implement the feature flag for {area}",
)
AREAS = ("the billing module", "the login page", "the nightly export", "the CI pipeline", "search")
SIGMA = 0.8  # spread of run times (lognormal)
CRASH = 0.015  # chance that a worker dies mid-task and its lease runs out
PERMANENT = 0.2  # share of failures reported with retry=false
CANCEL = 0.03


class SimulatedClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@dataclass
class SimulatedWorker:
    name: str
    directory: Directory
    slots: int
    night_shift: bool  # False: offline from 00:00 to 06:00 UTC
    # task id -> (when it ends, how it ends, when its lease runs out), as offsets in seconds
    running: dict[str, tuple[float, str, float]] = field(default_factory=dict)

    def online(self, at: datetime) -> bool:
        return self.night_shift or at.hour >= 6


@dataclass(frozen=True)
class DemoReport:
    tasks: int
    start: datetime
    end: datetime
    counts: dict[str, int]


def _activity(at: datetime) -> float:
    """Relative submission rate: office hours on weekdays are busiest."""
    weekend = at.weekday() >= 5
    if 8 <= at.hour < 18:
        return 0.35 if weekend else 1.0
    if 18 <= at.hour < 23:
        return 0.2 if weekend else 0.4
    return 0.1


def _arrivals(rng: random.Random, count: int, start: datetime, span: float) -> list[float]:
    times: list[float] = []
    while len(times) < count:
        offset = rng.uniform(0, span)
        if rng.random() < _activity(start + timedelta(seconds=offset)):
            times.append(offset)
    return sorted(times)


def _spec(rng: random.Random, directory: Directory, offset: float) -> TaskSpec:
    tags = rng.sample(list(TAGS), k=rng.choice((1, 1, 2)), counts=list(TAGS.values()))
    priority = rng.choices(list(PRIORITIES), weights=list(PRIORITIES.values()))[0]
    prompt = rng.choice(PROMPTS).format(area=rng.choice(AREAS))
    return task_spec(
        work_directory=directory.path,
        prompt=prompt,
        priority=priority,
        tags=sorted(set(tags)),
        max_retries=rng.choice((2, 3, 3, 5)),
        metadata={"simulated": True, "minute": int(offset // 60)},
    )


def _outcome(rng: random.Random, directory: Directory, tags: Sequence[str]) -> str:
    roll = rng.random()
    failure = directory.failure + (0.15 if "flaky" in tags else 0.0)
    if roll < CRASH:
        return "crash"
    if roll < CRASH + failure:
        return "fail-final" if rng.random() < PERMANENT else "fail"
    return "complete"


async def run_demo(
    database_url: str,
    tasks: int,
    *,
    days: float = 7.0,
    seed: int = 1,
    end: datetime | None = None,
    progress: Callable[[str], None] | None = None,
) -> DemoReport:
    """Fill an empty database with `tasks` simulated tasks submitted over `days` days that end at
    `end` (default now). At the end the workers stop as the reference worker does: the tasks they
    still run are released, so some are waiting but none is left WORKING."""
    if tasks < 1:
        raise ValueError("--tasks must be at least 1")
    if days <= 0:
        raise ValueError("--days must be positive")
    rng = random.Random(seed)
    finish = (end or datetime.now(UTC)).replace(second=0, microsecond=0)
    start = finish - timedelta(days=days)
    clock = SimulatedClock(start)
    settings = Settings(database_url=database_url, durability="normal")
    # No lease sweep or retention: the simulation expires leases itself, on its own clock.
    async with runtime(settings, serving=False, clock=clock, jitter=rng.random) as running:
        service = running.service
        existing = (await service.statistics()).total
        if existing:
            raise ValueError(
                f"the database already holds {existing} tasks; give a new file to --database"
            )
        await _simulate(service, clock, rng, tasks, start, finish, progress)
        counts = (await service.statistics()).counts
    return DemoReport(tasks, start, finish, {s.value: counts.get(s, 0) for s in TaskStatus})


def _workers(tasks: int, span: float) -> list[SimulatedWorker]:
    workers = []
    for directory in DIRECTORIES:
        mean_run = directory.median_run * math.exp(SIGMA**2 / 2)
        busy = tasks * directory.share * mean_run * 1.25 / span  # retries add work
        count = 2 if directory.share < 0.2 else 3
        slots = max(1, math.ceil(busy * HEADROOM / count))
        name = directory.path.rsplit("/", 1)[-1]
        for i in range(count):
            workers.append(
                SimulatedWorker(f"agent-{name}-{i + 1}", directory, slots, night_shift=i == 0)
            )
    return workers


async def _simulate(
    service: TaskService,
    clock: SimulatedClock,
    rng: random.Random,
    count: int,
    start: datetime,
    finish: datetime,
    progress: Callable[[str], None] | None,
) -> None:
    span = (finish - start).total_seconds()
    arrivals = _arrivals(rng, count, start, max(span - 600, 60))
    shares = [d.share for d in DIRECTORIES]
    plan = [(t, rng.choices(DIRECTORIES, weights=shares)[0]) for t in arrivals]
    workers = _workers(count, span)
    tags_of: dict[str, tuple[str, ...]] = {}
    dirty = {d.path: False for d in DIRECTORIES}
    due: list[tuple[float, str]] = []  # (offset, directory): a retry becomes claimable
    cancels: list[tuple[float, str]] = []
    lost: list[float] = []  # lease ends of tasks whose worker died
    next_arrival = 0
    t = 0.0
    step = _progress_step(count)

    while t <= span:
        clock.now = start + timedelta(seconds=t)
        while next_arrival < len(plan) and plan[next_arrival][0] <= t:
            # Batches stop at each progress step, so progress reads 1,000, 2,000, ... exactly.
            limit = min(next_arrival + 1000, (next_arrival // step + 1) * step)
            batch: list[TaskSpec] = []
            while next_arrival < min(len(plan), limit) and plan[next_arrival][0] <= t:
                batch.append(_spec(rng, plan[next_arrival][1], plan[next_arrival][0]))
                next_arrival += 1
            for task in await service.submit_many(batch):
                tags_of[task.id] = task.tags
                dirty[task.work_directory] = True
                if rng.random() < CANCEL:
                    heapq.heappush(cancels, (t + rng.uniform(TICK, 600), task.id))
            if progress and next_arrival % step == 0:
                progress(
                    f"{next_arrival:,} of {count:,} tasks submitted, at {clock.now:%Y-%m-%d %H:%M}"
                )
        while cancels and cancels[0][0] <= t:
            _, task_id = heapq.heappop(cancels)
            # Users cancel tasks that have not started; a running one is left to finish.
            if (await service.get(task_id)).status is TaskStatus.WAITING:
                await service.cancel(task_id, "no longer needed")
        while due and due[0][0] <= t:
            dirty[heapq.heappop(due)[1]] = True
        if lost and lost[0] < t:
            while lost and lost[0] < t:
                heapq.heappop(lost)
            for task in await service.expire_leases():
                if task.status is TaskStatus.WAITING:
                    dirty[task.work_directory] = True
        # Concurrent, so the store's writer commits the workers' changes together.
        busy = [w for w in workers if _has_work(w, t, dirty, clock.now)]
        await asyncio.gather(
            *(_step(service, clock, w, t, rng, tags_of, span, dirty, due, lost) for w in busy)
        )
        t = _next_time(t, plan, next_arrival, cancels, due, lost, workers, dirty, start)
    clock.now = finish
    await service.expire_leases()
    # The week is over: every worker stops and gives back what it still runs.
    await asyncio.gather(
        *(service.release(task_id, w.name) for w in workers for task_id in w.running)
    )


def _progress_step(count: int) -> int:
    """A round step (1,000, 2,000, 5,000, ...) of about a tenth of the tasks, at least 1,000."""
    tenth = max(count // 10, 1000)
    power = int(10 ** (len(str(tenth)) - 1))
    return tenth // power * power


def _next_time(
    t: float,
    plan: Sequence[tuple[float, Directory]],
    next_arrival: int,
    cancels: list[tuple[float, str]],
    due: list[tuple[float, str]],
    lost: list[float],
    workers: Sequence[SimulatedWorker],
    dirty: dict[str, bool],
    start: datetime,
) -> float:
    """The next tick at which something can happen: skipping quiet stretches keeps the demo fast."""
    candidates = [t + 3600.0]
    if next_arrival < len(plan):
        candidates.append(plan[next_arrival][0])
    for heap in (cancels, due):
        if heap:
            candidates.append(heap[0][0])
    if lost:
        candidates.append(lost[0] + TICK)
    for worker in workers:
        for end, _, lease in worker.running.values():
            candidates.append(min(end, lease - 300))
        if dirty[worker.directory.path] and len(worker.running) < worker.slots:
            hour = (start + timedelta(seconds=t)).replace(minute=0, second=0, microsecond=0)
            candidates.append(t if worker.online(start + timedelta(seconds=t)) else
                              (hour + timedelta(hours=1) - start).total_seconds())  # fmt: skip
    nxt = max(min(candidates), t + TICK)
    return math.ceil(nxt / TICK) * TICK


def _has_work(worker: SimulatedWorker, t: float, dirty: dict[str, bool], now: datetime) -> bool:
    if any(end <= t or lease - t <= 300 for end, _, lease in worker.running.values()):
        return True
    return (
        len(worker.running) < worker.slots and dirty[worker.directory.path] and worker.online(now)
    )


async def _step(
    service: TaskService,
    clock: SimulatedClock,
    worker: SimulatedWorker,
    t: float,
    rng: random.Random,
    tags_of: dict[str, tuple[str, ...]],
    span: float,
    dirty: dict[str, bool],
    due: list[tuple[float, str]],
    lost: list[float],
) -> None:
    """One worker's turn: report finished tasks, keep long ones alive, claim more if it has room."""
    now = clock()
    finished = [(i, o) for i, (end, o, _) in worker.running.items() if end <= t]
    completions = [Completion(i, {"summary": "done", "files_changed": rng.randint(1, 9)})
                   for i, o in finished if o == "complete"]  # fmt: skip
    if completions:
        await service.complete_many(worker.name, completions)
    for task_id, outcome in finished:
        end, _, lease = worker.running.pop(task_id)
        if outcome == "crash":
            heapq.heappush(lost, lease)  # nobody reports it: the lease sweep will requeue it
        elif outcome.startswith("fail"):
            error = rng.choice(("tests still failing", "merge conflict", "model timed out"))
            task = await service.fail(task_id, worker.name, error, retry=outcome == "fail")
            if task.status is TaskStatus.WAITING:
                ready = t if task.run_after is None else (task.run_after - now).total_seconds() + t
                heapq.heappush(due, (ready, task.work_directory))
    for task_id, (end, outcome, lease) in list(worker.running.items()):
        if outcome != "crash" and lease - t <= 300:
            await service.heartbeat(task_id, worker.name, LEASE)
            worker.running[task_id] = (end, outcome, t + LEASE)
    free = worker.slots - len(worker.running)
    path = worker.directory.path
    if free > 0 and dirty[path] and worker.online(now):
        claimed = await service.claim(path, worker.name, limit=min(free, 1000), lease_seconds=LEASE)
        if len(claimed) < free:
            dirty[path] = False
        for task in claimed:
            run = rng.lognormvariate(math.log(worker.directory.median_run), SIGMA)
            outcome = _outcome(rng, worker.directory, tags_of.get(task.id, ()))
            if outcome == "crash":
                run *= rng.random()
                if t + LEASE >= span - 2 * TICK:  # the sweep could not requeue it within the week
                    outcome = "complete"
            worker.running[task.id] = (t + max(run, 1.0), outcome, t + LEASE)
