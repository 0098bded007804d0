"""Replay a job trace against KEDA's queue-length scaling and Fleet's graceful drain.

This is a deterministic, discrete-time model of what the Kubernetes deployment in
infra/k8s does, used by tests/deploy/test_autoscaling_sim.py to show that, for the shipped
ScaledObject and Deployment settings, a burst's backlog clears, replicas return to the
minimum afterwards, and no job is cut off mid-run when a pod is scaled down.

What is modelled (and how it maps to the real system):

* Queue: the Redis lists of one Celery queue, one per priority step (kombu
  ``priority_steps`` [0, 3, 6, 9]); a worker takes from the lowest step first
  (``queue_order_strategy=priority``), FIFO within a list. The scaler sees the *sum* of
  the list lengths (one KEDA trigger per list, summed by the ScaledObject's scaling
  modifier). Jobs a worker already holds are not in the lists.
* Worker pod: ``startup_s`` after creation it starts consuming. It holds at most
  ``concurrency`` jobs (threads pool, ``worker_prefetch_multiplier=1``), completes at most
  ``jobs_per_s`` jobs per second (the per-replica throughput the lead measures; see
  ``DEFAULT_JOBS_PER_S_PER_REPLICA``), and a job takes at least its own duration.
* KEDA (every ``polling_interval_s``): the workload is *active* while the backlog exceeds
  ``activation_target``; from 0 replicas it scales to ``max(1, min_replicas)``; with
  ``min_replicas == 0`` it scales to 0 once inactive for ``cooldown_period_s``.
* HPA (every ``hpa_sync_period_s``, only while replicas > 0): AverageValue target,
  ``desired = ceil(backlog / target)`` unless within ``hpa_tolerance`` of the current
  ratio, clamped to [max(1, min), max]; scale-up/scale-down stabilization windows and the
  rate-limit policies of ``behavior`` (Pods / Percent per period, selectPolicy Max/Min).
* Scale-down: the ReplicaSet removes not-yet-ready pods first, then the youngest ready
  ones. A removed pod drains: it takes no new job, finishes what it holds, hands back
  (requeues at the head of its list) whatever is still running ``drain_grace_s`` after the
  SIGTERM, then exits after ``shutdown_s``. If it is still running at
  ``termination_grace_s`` it is SIGKILLed and its jobs are recorded as *killed*
  (they would come back only after Redis' visibility timeout).

Everything is seeded; the same inputs give the same result.

Run ``python bench/autoscale_sim.py`` for a printed example.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: Jobs per second one inference replica completes (embed, minilm, CPU pod with 4 cores).
#: A placeholder until bench/ measures it on the target hardware (docs/BENCHMARKS.md);
#: pass the measured value as ``WorkerModel(jobs_per_s=...)``.
DEFAULT_JOBS_PER_S_PER_REPLICA = 25.0

PRIORITY_STEPS = (0, 3, 6, 9)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Job:
    id: int
    arrival_s: float
    duration_s: float
    priority: int = 3


@dataclass(frozen=True)
class ScalingPolicy:
    """KEDA ScaledObject + HPA behaviour. Defaults are KEDA's and the HPA's own defaults."""

    min_replicas: int = 0
    max_replicas: int = 100
    target_per_replica: float = 5.0
    activation_target: float = 0.0
    polling_interval_s: float = 30.0
    cooldown_period_s: float = 300.0
    hpa_sync_period_s: float = 15.0
    hpa_tolerance: float = 0.1
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    #: (type, value, periodSeconds); type is "Pods" or "Percent".
    scale_up_policies: tuple[tuple[str, int, float], ...] = (("Pods", 4, 15.0), ("Percent", 100, 15.0))
    scale_up_select: str = "Max"
    scale_down_policies: tuple[tuple[str, int, float], ...] = (("Percent", 100, 15.0),)
    scale_down_select: str = "Max"

    def __post_init__(self) -> None:
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError("max_replicas must be >= max(1, min_replicas)")
        if self.target_per_replica <= 0:
            raise ValueError("target_per_replica must be > 0")

    @classmethod
    def from_scaled_object(cls, scaled_object: dict[str, Any]) -> ScalingPolicy:
        """Read the policy from a rendered KEDA ScaledObject (dict)."""
        spec = scaled_object["spec"]
        advanced = spec.get("advanced", {})
        modifiers = advanced.get("scalingModifiers")
        if modifiers:
            target = float(modifiers["target"])
            activation = float(modifiers.get("activationTarget", 0))
        else:  # without a modifier, each trigger's listLength is the target
            meta = spec["triggers"][0]["metadata"]
            target = float(meta.get("listLength", 5))
            activation = float(meta.get("activationListLength", 0))
        behavior = advanced.get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
        up, down = behavior.get("scaleUp", {}), behavior.get("scaleDown", {})

        def policies(rules: dict[str, Any], default: tuple) -> tuple:
            if "policies" not in rules:
                return default
            return tuple((p["type"], int(p["value"]), float(p["periodSeconds"])) for p in rules["policies"])

        base = cls()
        return cls(
            min_replicas=int(spec.get("minReplicaCount", 0)),
            max_replicas=int(spec.get("maxReplicaCount", 100)),
            target_per_replica=target,
            activation_target=activation,
            polling_interval_s=float(spec.get("pollingInterval", 30)),
            cooldown_period_s=float(spec.get("cooldownPeriod", 300)),
            scale_up_stabilization_s=float(up.get("stabilizationWindowSeconds", 0)),
            scale_down_stabilization_s=float(down.get("stabilizationWindowSeconds", 300)),
            scale_up_policies=policies(up, base.scale_up_policies),
            scale_up_select=up.get("selectPolicy", "Max"),
            scale_down_policies=policies(down, base.scale_down_policies),
            scale_down_select=down.get("selectPolicy", "Max"),
        )


@dataclass(frozen=True)
class WorkerModel:
    """One worker pod: throughput, capacity, start-up time and the drain budget."""

    jobs_per_s: float = DEFAULT_JOBS_PER_S_PER_REPLICA
    concurrency: int = 32
    startup_s: float = 30.0
    drain_grace_s: float = 120.0
    termination_grace_s: float = 150.0
    shutdown_s: float = 5.0

    @classmethod
    def from_deployment(cls, deployment: dict[str, Any], *, jobs_per_s: float = DEFAULT_JOBS_PER_S_PER_REPLICA,
                        startup_s: float = 30.0, default_concurrency: int = 32) -> WorkerModel:
        """Read drain grace, termination grace and concurrency from a rendered Deployment."""
        pod = deployment["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", []) if "value" in e}
        return cls(
            jobs_per_s=jobs_per_s,
            concurrency=int(env.get("FLEET_CONCURRENCY", default_concurrency)),
            startup_s=startup_s,
            drain_grace_s=float(env["FLEET_DRAIN_GRACE_S"]),
            termination_grace_s=float(pod.get("terminationGracePeriodSeconds", 30)),
        )


def bursty_trace(
    seed: int,
    *,
    horizon_s: float = 900.0,
    base_rate: float = 2.0,
    bursts: Iterable[tuple[float, float, float]] = ((60.0, 40.0, 150.0), (420.0, 20.0, 250.0)),
    mean_duration_s: float = 0.4,
    sigma: float = 0.6,
    max_duration_s: float = 5.0,
    priority_weights: dict[int, float] | None = None,
) -> list[Job]:
    """A seeded job trace: Poisson arrivals at ``base_rate``/s, plus bursts.

    ``bursts`` holds ``(start_s, length_s, rate_per_s)``; during a burst the arrival rate is
    ``base_rate + rate_per_s``. Durations are log-normal with the given mean, clipped to
    ``max_duration_s``. Priorities are drawn from ``priority_weights`` (Celery/kombu steps).
    """
    rng = random.Random(seed)
    weights = priority_weights or {0: 0.1, 3: 0.7, 6: 0.15, 9: 0.05}
    steps, probs = zip(*sorted(weights.items()))
    bursts = tuple(bursts)
    mu = math.log(mean_duration_s) - sigma**2 / 2

    def rate(t: float) -> float:
        return base_rate + sum(r for (s, length, r) in bursts if s <= t < s + length)

    peak = base_rate + sum(r for (_, _, r) in bursts)
    jobs: list[Job] = []
    t = 0.0
    while True:  # thinning: candidate arrivals at the peak rate, kept with rate(t)/peak
        t += rng.expovariate(peak)
        if t >= horizon_s:
            break
        if rng.random() * peak <= rate(t):
            duration = min(max_duration_s, rng.lognormvariate(mu, sigma))
            priority = rng.choices(steps, probs)[0]
            jobs.append(Job(len(jobs), round(t, 3), round(duration, 3), priority))
    return jobs


# --------------------------------------------------------------------------- state


@dataclass
class Pod:
    id: int
    created_s: float
    ready_s: float
    terminating_s: float | None = None
    exit_s: float | None = None
    killed: bool = False
    #: job id -> (start_s, end_s)
    running: dict[int, tuple[float, float]] = field(default_factory=dict)
    last_end_s: float = 0.0
    next_end_s: float = math.inf

    @property
    def live(self) -> bool:
        return self.terminating_s is None and self.exit_s is None


@dataclass
class Run:
    """One attempt of a job on a pod."""

    job_id: int
    pod_id: int
    start_s: float
    end_s: float
    outcome: str  # "done" | "handed_back" | "killed"


@dataclass
class SimResult:
    jobs: list[Job]
    runs: list[Run]
    pods: list[Pod]
    #: (t, desired replicas, live pods, pods alive incl. draining, backlog, jobs held)
    timeline: list[tuple[float, int, int, int, int, int]]
    end_s: float
    policy: ScalingPolicy
    worker: WorkerModel

    # ---- derived views
    def runs_of(self, outcome: str) -> list[Run]:
        return [r for r in self.runs if r.outcome == outcome]

    @property
    def completed(self) -> dict[int, Run]:
        return {r.job_id: r for r in self.runs_of("done")}

    @property
    def max_desired(self) -> int:
        return max(row[1] for row in self.timeline)

    @property
    def final_desired(self) -> int:
        return self.timeline[-1][1]

    def backlog_cleared_s(self) -> float:
        """The first time after which the backlog and the held jobs stay at zero."""
        last_busy = max((row[0] for row in self.timeline if row[4] or row[5]), default=0.0)
        return last_busy

    def backlog_zero_by(self, after_s: float) -> float | None:
        """The first time at or after ``after_s`` when nothing waits in the lists."""
        for t, _desired, _live, _alive, queued, _held in self.timeline:
            if t >= after_s and queued == 0:
                return t
        return None

    def first_time_desired_is(self, value: int, after_s: float) -> float | None:
        for t, desired, *_ in self.timeline:
            if t >= after_s and desired == value:
                return t
        return None

    def waits(self) -> list[float]:
        done = self.completed
        return [done[j.id].start_s - j.arrival_s for j in self.jobs if j.id in done]

    def summary(self) -> dict[str, Any]:
        waits = sorted(self.waits())

        def p(q: float) -> float:
            return waits[min(len(waits) - 1, int(q * len(waits)))] if waits else 0.0

        return {
            "jobs": len(self.jobs),
            "completed": len(self.completed),
            "handed_back": len(self.runs_of("handed_back")),
            "killed": len(self.runs_of("killed")),
            "pods_started": len(self.pods),
            "max_desired_replicas": self.max_desired,
            "final_desired_replicas": self.final_desired,
            "backlog_cleared_s": round(self.backlog_cleared_s(), 1),
            "wait_p50_s": round(p(0.50), 2),
            "wait_p99_s": round(p(0.99), 2),
            "wait_max_s": round(waits[-1], 2) if waits else 0.0,
            "end_s": round(self.end_s, 1),
        }


# --------------------------------------------------------------------------- scaler


class Autoscaler:
    """KEDA's activation loop plus the HPA's replica calculation with behaviour."""

    def __init__(self, policy: ScalingPolicy, initial_replicas: int) -> None:
        self.p = policy
        self.replicas = initial_replicas
        self.last_active_s = 0.0
        self.recommendations: deque[tuple[float, int]] = deque()
        self.events: deque[tuple[float, int]] = deque()  # (t, change)

    # -- the rule itself, exposed for unit tests
    def raw_desired(self, backlog: int, current: int) -> int:
        p = self.p
        if current > 0:
            ratio = backlog / (p.target_per_replica * current)
            if abs(ratio - 1.0) <= p.hpa_tolerance:
                return current
        desired = math.ceil(backlog / p.target_per_replica)
        return min(p.max_replicas, max(max(1, p.min_replicas), desired))

    def _period_start(self, now: float, period: float, direction: int) -> int:
        changes = sum(c for (t, c) in self.events if now - t < period and (c > 0) == (direction > 0))
        return self.replicas - changes

    def _limit(self, now: float, up: bool) -> int:
        p = self.p
        policies = p.scale_up_policies if up else p.scale_down_policies
        select = p.scale_up_select if up else p.scale_down_select
        if select == "Disabled":
            return self.replicas
        limits = []
        for kind, value, period in policies:
            start = self._period_start(now, period, +1 if up else -1)
            if up:
                limits.append(start + value if kind == "Pods" else math.ceil(start * (1 + value / 100)))
            else:
                limits.append(start - value if kind == "Pods" else int(start * (1 - value / 100)))
        if up:
            return max(limits) if select == "Max" else min(limits)
        return min(limits) if select == "Max" else max(limits)

    def hpa_step(self, now: float, backlog: int) -> None:
        if self.replicas == 0:
            return  # the HPA does not act at zero; KEDA activates
        p = self.p
        rec = self.raw_desired(backlog, self.replicas)
        self.recommendations.append((now, rec))
        horizon = max(p.scale_up_stabilization_s, p.scale_down_stabilization_s)
        while self.recommendations and now - self.recommendations[0][0] > horizon:
            self.recommendations.popleft()
        up_rec = min([r for (t, r) in self.recommendations if now - t <= p.scale_up_stabilization_s] + [rec])
        down_rec = max([r for (t, r) in self.recommendations if now - t <= p.scale_down_stabilization_s] + [rec])
        desired = self.replicas
        if desired < up_rec:
            desired = up_rec
        if desired > down_rec:
            desired = down_rec
        if desired > self.replicas:
            desired = min(desired, self._limit(now, up=True))
        elif desired < self.replicas:
            desired = max(desired, self._limit(now, up=False))
        self._set(now, desired)

    def keda_step(self, now: float, backlog: int) -> None:
        p = self.p
        if backlog > p.activation_target:
            self.last_active_s = now
            if self.replicas == 0:
                self._set(now, max(1, p.min_replicas))
        elif self.replicas > 0 and p.min_replicas == 0 and now - self.last_active_s >= p.cooldown_period_s:
            self._set(now, 0)
            self.recommendations.clear()

    def _set(self, now: float, desired: int) -> None:
        if desired != self.replicas:
            self.events.append((now, desired - self.replicas))
            while self.events and now - self.events[0][0] > 1800:
                self.events.popleft()
            self.replicas = desired


# --------------------------------------------------------------------------- simulation


def simulate(
    jobs: list[Job],
    policy: ScalingPolicy,
    worker: WorkerModel,
    *,
    dt: float = 0.1,
    settle_s: float | None = None,
    max_s: float = 7 * 24 * 3600.0,
    initial_replicas: int | None = None,
    seed: int = 0,
) -> SimResult:
    """Run the trace until every job is done (or dropped), then ``settle_s`` more seconds.

    ``settle_s`` defaults to the time the scaler needs to return to its minimum
    (stabilization window + cooldown + a few loop periods). Idle workers block on BRPOP
    together, so which one gets the next message is arbitrary: the order in which pods
    take jobs is shuffled each step with ``random.Random(seed)``.
    """
    if settle_s is None:
        settle_s = (policy.scale_down_stabilization_s + policy.cooldown_period_s
                    + 4 * max(policy.polling_interval_s, policy.hpa_sync_period_s) + worker.termination_grace_s)
    steps_per_s = round(1 / dt)
    if abs(steps_per_s * dt - 1) > 1e-9:
        raise ValueError("dt must divide one second")
    pending = sorted(jobs, key=lambda j: (j.arrival_s, j.id))
    by_id = {j.id: j for j in jobs}
    lists: dict[int, deque[int]] = {step: deque() for step in PRIORITY_STEPS}
    start_replicas = policy.min_replicas if initial_replicas is None else initial_replicas
    scaler = Autoscaler(policy, start_replicas)
    pods: list[Pod] = []
    runs: list[Run] = []
    timeline: list[tuple[float, int, int, int, int, int]] = []
    next_arrival = 0
    done_or_dropped = 0
    keda_every = max(1, round(policy.polling_interval_s * steps_per_s))
    hpa_every = max(1, round(policy.hpa_sync_period_s * steps_per_s))
    tick = 0
    quiet_since: float | None = None
    rng = random.Random(seed)

    def add_pod(now: float, ready_now: bool = False) -> None:
        ready = now if ready_now else now + worker.startup_s
        pods.append(Pod(len(pods), now, ready))

    for _ in range(start_replicas):
        add_pod(0.0, ready_now=True)

    def backlog() -> int:
        return sum(len(q) for q in lists.values())

    def step_for(priority: int) -> int:
        eligible = [s for s in PRIORITY_STEPS if s <= priority]
        return eligible[-1] if eligible else PRIORITY_STEPS[0]

    while True:
        now = tick / steps_per_s
        # 1. arrivals
        while next_arrival < len(pending) and pending[next_arrival].arrival_s <= now:
            job = pending[next_arrival]
            lists[step_for(job.priority)].append(job.id)
            next_arrival += 1

        # 2. running jobs finish; draining pods hand back / exit / get killed
        for pod in pods:
            if pod.exit_s is not None:
                continue
            if pod.next_end_s <= now:
                for job_id, (start, end) in list(pod.running.items()):
                    if end <= now:
                        runs.append(Run(job_id, pod.id, start, end, "done"))
                        del pod.running[job_id]
                        done_or_dropped += 1
                pod.next_end_s = min((e for (_, e) in pod.running.values()), default=math.inf)
            if pod.terminating_s is None:
                continue
            since = now - pod.terminating_s
            if pod.running and since >= worker.drain_grace_s:
                for job_id, (start, _end) in sorted(pod.running.items(), key=lambda kv: -kv[1][0]):
                    runs.append(Run(job_id, pod.id, start, now, "handed_back"))
                    lists[step_for(by_id[job_id].priority)].appendleft(job_id)
                pod.running.clear()
                pod.next_end_s = math.inf
                pod.last_end_s = now
            if not pod.running and now >= max(pod.last_end_s, pod.terminating_s) + worker.shutdown_s:
                pod.exit_s = now
            if pod.exit_s is None and since >= worker.termination_grace_s:
                for job_id, (start, _end) in pod.running.items():
                    runs.append(Run(job_id, pod.id, start, now, "killed"))
                    done_or_dropped += 1  # it would return only after the visibility timeout
                pod.running.clear()
                pod.killed = True
                pod.exit_s = now

        # 3. live, ready pods take jobs (highest priority list first, FIFO within a list)
        takers = [p for p in pods if p.live and now >= p.ready_s] if any(lists.values()) else []
        rng.shuffle(takers)
        for pod in takers:
            while len(pod.running) < worker.concurrency:
                step = next((s for s in PRIORITY_STEPS if lists[s]), None)
                if step is None:
                    break
                job_id = lists[step].popleft()
                job = by_id[job_id]
                end = max(now + job.duration_s, max(pod.last_end_s, now) + 1.0 / worker.jobs_per_s)
                pod.last_end_s = end
                pod.running[job_id] = (now, end)
                pod.next_end_s = min(pod.next_end_s, end)

        # 4. the scaler, then the Deployment controller
        queued = backlog()
        if tick % keda_every == 0:
            scaler.keda_step(now, queued)
        if tick % hpa_every == 0:
            scaler.hpa_step(now, queued)
        live = [p for p in pods if p.live]
        if scaler.replicas > len(live):
            for _ in range(scaler.replicas - len(live)):
                add_pod(now)
        elif scaler.replicas < len(live):
            # ReplicaSet victim order: not ready yet first, then the most recently ready.
            victims = sorted(live, key=lambda p: (p.ready_s <= now, -p.ready_s, -p.id))
            for pod in victims[: len(live) - scaler.replicas]:
                pod.terminating_s = now
                if now < pod.ready_s:
                    pod.exit_s = now  # never consumed: nothing to drain
                else:
                    pod.last_end_s = max([pod.last_end_s] + [e for (_, e) in pod.running.values()])

        held = sum(len(p.running) for p in pods if p.exit_s is None)
        alive = sum(1 for p in pods if p.exit_s is None)
        timeline.append((now, scaler.replicas, sum(1 for p in pods if p.live), alive, queued, held))

        # 5. stop once everything ran and the scaler has had time to settle
        all_in = next_arrival == len(pending) and done_or_dropped >= len(jobs) and queued == 0 and held == 0
        if all_in:
            quiet_since = now if quiet_since is None else quiet_since
            if now - quiet_since >= settle_s and alive == scaler.replicas:
                break
        else:
            quiet_since = None
        if now >= max_s:
            break
        tick += 1
    return SimResult(jobs=jobs, runs=runs, pods=pods, timeline=timeline, end_s=now, policy=policy, worker=worker)


def check_no_cut_off(result: SimResult) -> list[str]:
    """Every problem with the drain: empty means every job ran once, whole, inside its pod."""
    problems: list[str] = []
    pods = {p.id: p for p in result.pods}
    for run in result.runs:
        if run.outcome != "done":
            problems.append(f"job {run.job_id} {run.outcome} on pod {run.pod_id} at {run.end_s:.1f}s")
            continue
        pod = pods[run.pod_id]
        if run.start_s < pod.ready_s:
            problems.append(f"job {run.job_id} started before pod {pod.id} was ready")
        # (Within one step, jobs are taken before the scaler acts: a job that starts at the
        # very instant of the SIGTERM was taken before it.)
        if pod.terminating_s is not None and run.start_s > pod.terminating_s:
            problems.append(f"job {run.job_id} started on draining pod {pod.id}")
        if pod.exit_s is not None and run.end_s > pod.exit_s:
            problems.append(f"job {run.job_id} ended after pod {pod.id} exited")
    for pod in result.pods:
        if pod.killed:
            problems.append(f"pod {pod.id} was SIGKILLed at the end of its grace period")
        if pod.terminating_s is not None and pod.exit_s is not None:
            if pod.exit_s - pod.terminating_s > result.worker.termination_grace_s:
                problems.append(f"pod {pod.id} outlived its grace period")
    completed = result.completed
    attempts = Counter(r.job_id for r in result.runs)
    for job in result.jobs:
        if job.id not in completed:
            problems.append(f"job {job.id} never completed")
        elif attempts[job.id] != 1:
            problems.append(f"job {job.id} ran {attempts[job.id]} times")
    return problems


def _example() -> None:  # pragma: no cover - manual use
    jobs = bursty_trace(seed=7)
    policy = ScalingPolicy(min_replicas=1, max_replicas=8, target_per_replica=64, polling_interval_s=10,
                           scale_down_stabilization_s=120,
                           scale_down_policies=(("Percent", 50, 60.0),))
    result = simulate(jobs, policy, WorkerModel())
    print(result.summary())
    print("problems:", check_no_cut_off(result) or "none")
    last = None
    for t, desired, live, alive, queued, held in result.timeline:
        if (desired, live, alive) != last or int(t * 10) % 300 == 0:
            print(f"t={t:7.1f}s desired={desired:2d} live={live:2d} alive={alive:2d} backlog={queued:5d} "
                  f"held={held:4d}")
            last = (desired, live, alive)


if __name__ == "__main__":  # pragma: no cover
    _example()
