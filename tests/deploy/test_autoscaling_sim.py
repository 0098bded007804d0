"""Replay bursty job traces against KEDA's scaling rule with the shipped settings.

The policy (min/max replicas, target backlog per replica, polling interval, cooldown, HPA
behaviour) and the drain budget (FLEET_DRAIN_GRACE_S, terminationGracePeriodSeconds,
FLEET_CONCURRENCY) are read from the rendered overlays in infra/k8s, so these tests fail
when a manifest change would let the backlog pile up, leave replicas stranded after a
burst, or cut a job off during scale-down. The model is bench/autoscale_sim.py.

Worker throughput (jobs/s per replica) is a parameter: DEFAULT_JOBS_PER_S_PER_REPLICA for
CPU pods; GPU_JOBS_PER_S below, the one-worker saturated rate measured on an H100
(docs/BENCHMARKS.md, GPU results).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest

from tests.support.script_modules import load_script

ROOT = Path(__file__).resolve().parents[2]



sim = load_script("fleet_bench_autoscale_sim", ROOT / "bench" / "autoscale_sim.py")
render = load_script("fleet_infra_k8s_render", ROOT / "infra" / "k8s" / "render.py")

#: Per-replica throughput of one GPU worker: 142 single-text jobs/s saturated, measured on an
#: H100 (docs/BENCHMARKS.md); bound by the per-job path, so the same for minilm as for BERT-base.
GPU_JOBS_PER_S = 142.0
SEED = 20240611


@pytest.fixture(scope="module")
def manifests():
    try:
        return {name: render.render(path) for name, path in render.OVERLAYS.items()}
    except render.RenderUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def shipped(manifests, overlay: str, name: str, **worker_kwargs):
    resources = manifests[overlay]
    policy = sim.ScalingPolicy.from_scaled_object(render.one(resources, "ScaledObject", name))
    worker = sim.WorkerModel.from_deployment(render.one(resources, "Deployment", name), **worker_kwargs)
    return policy, worker


def assert_healthy_burst(result, burst_end_s: float) -> None:
    policy = result.policy
    problems = sim.check_no_cut_off(result)
    assert not problems, problems[:10]
    summary = result.summary()
    assert summary["completed"] == summary["jobs"] > 0
    # The burst made KEDA scale out...
    assert result.max_desired > policy.min_replicas
    # ...the backlog cleared soon after the burst ended...
    cleared = result.backlog_zero_by(burst_end_s)
    assert cleared is not None and cleared - burst_end_s <= 120, (cleared, summary)
    # ...and the replicas came back to the minimum within the scale-down window, policy
    # steps and loop periods (not "eventually").
    halvings = max(1, math.ceil(math.log2(max(policy.max_replicas, 2))))
    step = max(p[2] for p in policy.scale_down_policies)
    bound = policy.scale_down_stabilization_s + halvings * step + 3 * policy.hpa_sync_period_s
    back = result.first_time_desired_is(policy.min_replicas, after_s=cleared)
    assert back is not None and back - cleared <= bound + policy.cooldown_period_s, (back, cleared, bound)
    assert result.final_desired == policy.min_replicas
    # At the end only the minimum is alive: every scaled-down pod drained and exited.
    assert sum(1 for p in result.pods if p.exit_s is None) == policy.min_replicas
    assert all(p.exit_s - p.terminating_s <= result.worker.termination_grace_s
               for p in result.pods if p.terminating_s is not None)


# ----------------------------------------------------------------------------- shipped settings


def test_cpu_inference_burst_clears_and_scales_back(manifests):
    policy, worker = shipped(manifests, "cpu", "fleet-worker-minilm")
    assert policy.min_replicas == 1 and policy.target_per_replica == 64
    jobs = sim.bursty_trace(SEED, horizon_s=600, base_rate=3.0, bursts=((60.0, 30.0, 120.0),))
    result = sim.simulate(jobs, policy, worker)
    assert_healthy_burst(result, burst_end_s=90.0)
    # Pods were scaled down while they still held jobs (the base load keeps every worker
    # busy now and then): those jobs finished after the SIGTERM, inside the grace period.
    pods = {p.id: p for p in result.pods}
    finished_while_draining = [r for r in result.runs_of("done")
                               if pods[r.pod_id].terminating_s is not None and r.end_s > pods[r.pod_id].terminating_s]
    assert finished_while_draining


def test_gpu_inference_burst_clears_and_scales_back(manifests):
    policy, worker = shipped(manifests, "gpu", "fleet-worker-minilm", jobs_per_s=GPU_JOBS_PER_S, startup_s=60.0)
    assert policy.max_replicas == 4
    jobs = sim.bursty_trace(SEED + 1, horizon_s=600, base_rate=20.0, bursts=((60.0, 30.0, 600.0),),
                            mean_duration_s=0.15, max_duration_s=2.0)
    result = sim.simulate(jobs, policy, worker)
    assert_healthy_burst(result, burst_end_s=90.0)


def training_trace(seed: int) -> list:
    """Six training jobs of 10-90 minutes: a burst of five, then a lone one hours later."""
    rng = random.Random(seed)
    jobs = [sim.Job(i, 60.0 + 20.0 * i, round(rng.uniform(600, 5400), 1), rng.choice([0, 3, 6])) for i in range(5)]
    jobs.append(sim.Job(5, 4 * 3600.0, 1800.0, 3))
    return jobs


def test_training_scales_from_zero_and_back_without_cutting_a_job(manifests):
    policy, worker = shipped(manifests, "cpu", "fleet-trainer", jobs_per_s=1.0, startup_s=60.0)
    assert policy.min_replicas == 0 and worker.concurrency == 1
    jobs = training_trace(SEED)
    assert max(j.duration_s for j in jobs) <= worker.drain_grace_s
    result = sim.simulate(jobs, policy, worker, dt=1.0, max_s=12 * 3600.0)
    problems = sim.check_no_cut_off(result)
    assert not problems, problems
    assert result.timeline[0][1] == 0 and result.final_desired == 0
    assert result.max_desired == policy.max_replicas
    # The queue empties while jobs still run; KEDA then scales down after its cooldown and
    # the pods chosen drain: their jobs finish after the SIGTERM, inside the grace period.
    pods = {p.id: p for p in result.pods}
    finished_while_draining = [r for r in result.runs_of("done")
                               if pods[r.pod_id].terminating_s is not None and r.end_s > pods[r.pod_id].terminating_s]
    assert finished_while_draining, "the scenario must exercise a drain with a job in flight"
    assert all(p.exit_s is not None for p in result.pods)


def test_grace_shorter_than_the_longest_job_is_caught():
    """Control: with a drain grace below the job length, jobs are handed back (and, since
    the list is empty while a job runs, KEDA keeps scaling the pod away: the job never
    finishes). The checker must report it."""
    policy = sim.ScalingPolicy(min_replicas=0, max_replicas=2, target_per_replica=1, polling_interval_s=30,
                               cooldown_period_s=300, scale_down_stabilization_s=300,
                               scale_down_policies=(("Pods", 1, 60.0),))
    worker = sim.WorkerModel(jobs_per_s=1.0, concurrency=1, startup_s=60.0, drain_grace_s=600, termination_grace_s=630)
    result = sim.simulate(training_trace(SEED), policy, worker, dt=1.0, max_s=6 * 3600.0)
    problems = sim.check_no_cut_off(result)
    assert any("handed_back" in p for p in problems)
    assert any("never completed" in p for p in problems)


def test_termination_grace_below_drain_grace_gets_jobs_killed():
    policy = sim.ScalingPolicy(min_replicas=0, max_replicas=1, target_per_replica=1, polling_interval_s=30,
                               cooldown_period_s=60, scale_down_stabilization_s=0)
    worker = sim.WorkerModel(jobs_per_s=1.0, concurrency=1, startup_s=10.0, drain_grace_s=3600, termination_grace_s=300)
    result = sim.simulate([sim.Job(0, 10.0, 1200.0)], policy, worker, dt=1.0, max_s=3 * 3600.0)
    assert result.runs_of("killed")
    assert any("SIGKILL" in p for p in sim.check_no_cut_off(result))


# ----------------------------------------------------------------------------- the rule itself


def test_desired_replicas_is_ceil_backlog_over_target_clamped():
    policy = sim.ScalingPolicy(min_replicas=1, max_replicas=8, target_per_replica=64)
    scaler = sim.Autoscaler(policy, initial_replicas=2)
    assert scaler.raw_desired(0, 2) == 1            # clamped to min
    assert scaler.raw_desired(65, 0) == 2           # ceil(65 / 64)
    assert scaler.raw_desired(300, 2) == 5          # ceil(300 / 64)
    assert scaler.raw_desired(10_000, 2) == 8       # clamped to max
    assert scaler.raw_desired(130, 2) == 2          # within the HPA's 10 % tolerance
    zero_min = sim.Autoscaler(sim.ScalingPolicy(min_replicas=0, max_replicas=3, target_per_replica=1), 1)
    assert zero_min.raw_desired(0, 1) == 1          # the HPA floor is 1; KEDA does 1 -> 0


def test_scale_down_waits_for_the_stabilization_window_and_cooldown():
    policy = sim.ScalingPolicy(min_replicas=0, max_replicas=10, target_per_replica=10, polling_interval_s=30,
                               cooldown_period_s=300, scale_down_stabilization_s=120)
    scaler = sim.Autoscaler(policy, initial_replicas=0)
    scaler.keda_step(0.0, 95)
    assert scaler.replicas == 1                      # activation: 0 -> 1
    scaler.hpa_step(15.0, 95)
    assert scaler.replicas == 5                      # want 10; scale-up limit max(1 + 4 pods, 1 * 200 %) = 5
    scaler.keda_step(30.0, 95)                       # still active at t = 30
    scaler.hpa_step(30.0, 95)
    assert scaler.replicas == 10
    for t in range(45, 150, 15):                     # backlog gone, but the window holds 10
        scaler.hpa_step(float(t), 0)
        assert scaler.replicas == 10, t
    scaler.hpa_step(165.0, 0)
    assert scaler.replicas == 1                      # window passed: down to the HPA floor
    for t in range(60, 330, 30):
        scaler.keda_step(float(t), 0)
    assert scaler.replicas == 1                      # cooldown (300 s since last active) not over
    scaler.keda_step(330.0, 0)
    assert scaler.replicas == 0


def test_high_priority_jobs_overtake_the_backlog():
    policy = sim.ScalingPolicy(min_replicas=1, max_replicas=1, target_per_replica=1000)
    worker = sim.WorkerModel(jobs_per_s=10.0, concurrency=1, startup_s=0.0)
    bulk = [sim.Job(i, 0.0, 0.1, 6) for i in range(50)]
    urgent = sim.Job(50, 1.0, 0.1, 0)
    result = sim.simulate(bulk + [urgent], policy, worker, settle_s=0.0)
    done = result.completed
    assert done[50].start_s - urgent.arrival_s < 0.5
    assert sum(1 for j in bulk if done[j.id].start_s > done[50].start_s) > 30


def test_simulation_is_deterministic():
    policy = sim.ScalingPolicy(min_replicas=1, max_replicas=6, target_per_replica=32, polling_interval_s=10,
                               scale_down_stabilization_s=60)
    worker = sim.WorkerModel(jobs_per_s=20.0, concurrency=16, startup_s=20.0)
    a = sim.bursty_trace(7, horizon_s=300, bursts=((30.0, 20.0, 80.0),))
    b = sim.bursty_trace(7, horizon_s=300, bursts=((30.0, 20.0, 80.0),))
    c = sim.bursty_trace(8, horizon_s=300, bursts=((30.0, 20.0, 80.0),))
    assert a == b and a != c
    first, second = sim.simulate(a, policy, worker), sim.simulate(b, policy, worker)
    assert first.summary() == second.summary()
    assert first.timeline == second.timeline
