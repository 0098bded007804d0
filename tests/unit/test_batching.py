"""Unit tests of DynamicBatcher with plain Python batch functions (no Redis, no model).

No test here asserts that something is fast: only what ran, in which batches, with which
result or error, and that nobody hangs (every wait has a generous sanity timeout).
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from workers.serving.batching import (
    BatchContractError,
    BatcherClosed,
    BatcherConfigError,
    BatchInfo,
    DynamicBatcher,
    QueueFullError,
)

SANITY_S = 30  # no future may take longer than this to resolve; it never should come close


@pytest.fixture()
def batchers():
    made: list[DynamicBatcher] = []

    def make(run_batch, **options) -> DynamicBatcher:
        options.setdefault("max_batch_size", 8)
        options.setdefault("max_wait_s", 0.005)
        batcher = DynamicBatcher("test", run_batch, **options)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.close()


class Recorder:
    """A batch function that doubles numbers, records each batch, and can be held at a gate."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list] = []
        self.infos: list[BatchInfo] = []
        self.started_at: list[float] = []
        self.gate = gate
        self.lock = threading.Lock()

    def __call__(self, payloads, info):
        with self.lock:
            self.started_at.append(time.monotonic())
            self.batches.append(list(payloads))
            self.infos.append(info)
        if self.gate is not None:
            assert self.gate.wait(SANITY_S)
        return [p * 2 if isinstance(p, (int, float)) else p for p in payloads]


def results(futures):
    return [future.result(timeout=SANITY_S) for future in futures]


def hold_device(make, recorder: Recorder, **options):
    """A batcher whose device thread is stuck in a first batch until ``recorder.gate`` opens."""
    batcher = make(recorder, **options)
    first = batcher.submit([-1])
    deadline = time.monotonic() + SANITY_S
    while not recorder.batches and time.monotonic() < deadline:
        time.sleep(0.001)
    assert recorder.batches == [[-1]]
    return batcher, first


# --- configuration ---------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
    ({"max_batch_size": 2.5}, "max_batch_size must be an int"),
    ({"max_batch_size": True}, "max_batch_size must be an int"),
    ({"max_wait_s": -0.001}, "max_wait_s must be finite and >= 0"),
    ({"max_wait_s": float("inf")}, "max_wait_s must be finite and >= 0"),
    ({"max_wait_s": float("nan")}, "max_wait_s must be finite and >= 0"),
    ({"max_wait_s": "5ms"}, "max_wait_s must be a number of seconds"),
    ({"max_queue_size": 4, "max_batch_size": 8}, "max_queue_size (4) must be >= max_batch_size (8)"),
    ({"wait_policy": "eager"}, "wait_policy must be one of fixed, adaptive"),
    ({"on_out_of_memory": 3}, "on_out_of_memory must be callable"),
    ({"sort_window_batches": 0}, "sort_window_batches must be >= 1"),
])
def test_bad_configuration_is_refused_up_front(options, message):
    full = {"max_batch_size": 8, "max_wait_s": 0.005, **options}
    with pytest.raises(BatcherConfigError) as caught:
        DynamicBatcher("test", lambda payloads, info: payloads, **full)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_batch_function_must_be_callable():
    with pytest.raises(BatcherConfigError, match="run_batch must be callable"):
        DynamicBatcher("test", None, max_batch_size=4, max_wait_s=0.0)


# --- results and batch formation --------------------------------------------------------

@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_every_caller_gets_its_own_results_in_order(batchers, policy):
    recorder = Recorder()
    batcher = batchers(recorder, max_batch_size=16, max_wait_s=0.002, wait_policy=policy)

    def job(start: int) -> list[int]:
        return results(batcher.submit(list(range(start, start + 5))))

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(job, range(0, 500, 5)))
    assert outcomes == [[2 * n for n in range(start, start + 5)] for start in range(0, 500, 5)]
    assert sorted(p for batch in recorder.batches for p in batch) == list(range(500))
    assert batcher.stats.items == 500


def test_batches_never_exceed_max_batch_size(batchers):
    recorder = Recorder()
    batcher = batchers(recorder, max_batch_size=7, max_wait_s=0.002)
    futures = batcher.submit(list(range(100)))  # one bulk submission larger than a batch
    with ThreadPoolExecutor(8) as pool:
        for chunk in pool.map(lambda s: batcher.submit(list(range(s, s + 3))), range(100, 400, 3)):
            futures.extend(chunk)
    results(futures)
    sizes = [len(batch) for batch in recorder.batches]
    assert max(sizes) <= 7
    assert sum(sizes) == 400
    assert batcher.stats.largest_batch_size <= 7
    assert any(size == 7 for size in sizes)  # the bulk submission filled batches


def test_waiting_items_are_merged_into_one_batch(batchers):
    gate = threading.Event()
    recorder = Recorder(gate)
    batcher, first = hold_device(batchers, recorder, max_batch_size=32, max_wait_s=0.005)
    futures = [batcher.submit([n])[0] for n in range(20)]  # twenty single-item jobs queue up
    gate.set()
    assert results(futures) == [2 * n for n in range(20)]
    results(first)
    assert recorder.batches[1] == list(range(20))
    assert batcher.stats.mean_batch_size > 1


def test_waiting_items_are_sorted_by_cost_into_batches(batchers):
    gate = threading.Event()
    recorder = Recorder(gate)
    batcher, first = hold_device(batchers, recorder, max_batch_size=4, max_wait_s=0.005)
    costs = list(range(16))
    random.Random(7).shuffle(costs)
    futures = [batcher.submit([cost], costs=[cost])[0] for cost in costs]
    gate.set()
    results(futures)
    results(first)
    later = [sorted(batch) for batch in recorder.batches[1:]]
    # Sixteen waiting items, max batch 4: four batches, each a run of neighbours by cost.
    assert sorted(later) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


# --- waiting policy ----------------------------------------------------------------------

def test_fixed_policy_runs_a_lone_item_after_max_wait(batchers):
    recorder = Recorder()
    max_wait_s = 0.05
    batcher = batchers(recorder, max_batch_size=8, max_wait_s=max_wait_s, wait_policy="fixed")
    future = batcher.submit([21])[0]
    assert future.result(timeout=SANITY_S) == 42  # it ran: not held indefinitely
    (info,) = recorder.infos
    waited = recorder.started_at[0] - info.enqueued_at[0]
    assert waited >= max_wait_s  # ... and it waited for batch-mates as long as allowed
    assert info.reason == "timeout"
    assert batcher.stats.dispatch["timeout"] == 1


def test_adaptive_policy_runs_a_lone_item_without_waiting_for_batch_mates(batchers):
    recorder = Recorder()
    batcher = batchers(recorder, max_batch_size=8, max_wait_s=60.0)  # default policy: adaptive
    assert batcher.wait_policy == "adaptive"
    future = batcher.submit([21])[0]
    assert future.result(timeout=SANITY_S) == 42  # far sooner than max_wait would allow
    assert recorder.infos[0].reason == "idle"
    assert batcher.stats.dispatch["idle"] == 1


def test_adaptive_policy_still_batches_items_that_arrive_together(batchers):
    recorder = Recorder()
    batcher = batchers(recorder, max_batch_size=8, max_wait_s=60.0)
    assert results(batcher.submit([1, 2, 3, 4, 5, 6, 7, 8])) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert recorder.batches == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert recorder.infos[0].reason == "full"


def test_zero_max_wait_runs_what_is_there(batchers):
    recorder = Recorder()
    batcher = batchers(recorder, max_batch_size=8, max_wait_s=0.0, wait_policy="fixed")
    assert results(batcher.submit([1, 2, 3])) == [2, 4, 6]
    assert recorder.batches == [[1, 2, 3]]


# --- failures ----------------------------------------------------------------------------

def test_a_poisoned_input_fails_alone(batchers):
    gate = threading.Event()
    seen: list[list] = []

    def model(payloads, info):
        seen.append(list(payloads))
        if "poison" in payloads:
            raise ValueError("cannot digest poison")
        return [p.upper() for p in payloads]

    blocker = Recorder(gate)
    calls = {"n": 0}

    def run(payloads, info):  # the first call holds the device so that all jobs share one batch
        calls["n"] += 1
        return blocker(payloads, info) if calls["n"] == 1 else model(payloads, info)

    batcher, first = hold_device(batchers, _Adapter(run, blocker), max_batch_size=16, max_wait_s=0.005)
    words = [f"word{n}" for n in range(11)]
    jobs = [batcher.submit([word])[0] for word in words[:5]]
    poisoned = batcher.submit(["poison"])[0]
    jobs += [batcher.submit([word])[0] for word in words[5:]]
    gate.set()
    results(first)
    assert results(jobs) == [word.upper() for word in words]
    with pytest.raises(ValueError, match="cannot digest poison"):
        poisoned.result(timeout=SANITY_S)
    assert len(seen[0]) == 12  # all twelve were first tried together, in one batch
    assert batcher.stats.splits >= 1
    assert batcher.stats.failed_items == 1
    assert results(batcher.submit(["after"])) == ["AFTER"]  # and the batcher keeps serving


class _Adapter:
    """Route calls to ``run`` while exposing the blocker's record (for ``hold_device``)."""

    def __init__(self, run, blocker: Recorder):
        self._run, self.blocker = run, blocker

    def __call__(self, payloads, info):
        return self._run(payloads, info)

    @property
    def batches(self):
        return self.blocker.batches


def test_a_wrong_output_count_fails_every_waiting_job_clearly(batchers):
    gate = threading.Event()
    blocker = Recorder(gate)
    calls = {"n": 0}

    def run(payloads, info):
        calls["n"] += 1
        if calls["n"] == 1:
            return blocker(payloads, info)
        return list(payloads)[:-1]  # one output short

    batcher, first = hold_device(batchers, _Adapter(run, blocker), max_batch_size=16, max_wait_s=0.005)
    jobs = [batcher.submit([n, n + 100]) for n in range(6)]  # six jobs of two items each
    gate.set()
    results(first)
    for futures in jobs:
        for future in futures:
            with pytest.raises(BatchContractError) as caught:
                future.result(timeout=SANITY_S)
            assert "returned 11 outputs for a batch of 12 inputs" in str(caught.value)
    assert batcher.stats.contract_errors == 1


@pytest.mark.parametrize("bad_output", [None, 42, (x for x in range(3))])
def test_a_non_sequence_output_fails_the_batch_clearly(batchers, bad_output):
    batcher = batchers(lambda payloads, info: bad_output, max_batch_size=4, max_wait_s=0.0)
    futures = batcher.submit([1, 2, 3])
    for future in futures:
        with pytest.raises(BatchContractError, match="expected one output per input"):
            future.result(timeout=SANITY_S)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dying_device_thread_strands_nobody(batchers):
    def run(payloads, info):
        raise SystemExit("device thread killed")  # not an Exception: escapes per-batch isolation

    batcher = batchers(run, max_batch_size=4, max_wait_s=0.0)
    futures = batcher.submit([1, 2])
    for future in futures:
        with pytest.raises(BatcherClosed, match="device thread killed"):
            future.result(timeout=SANITY_S)
    with pytest.raises(BatcherClosed):
        batcher.submit([3])


def test_close_fails_queued_items_and_refuses_new_ones(batchers):
    gate = threading.Event()
    recorder = Recorder(gate)
    batcher, first = hold_device(batchers, recorder, max_batch_size=4, max_wait_s=0.005)
    queued = batcher.submit([1, 2, 3])
    closer = threading.Thread(target=batcher.close, kwargs={"timeout": SANITY_S})
    closer.start()
    time.sleep(0.05)
    gate.set()
    closer.join(SANITY_S)
    results(first)
    for future in queued:  # either run before the stop or failed by it; never left pending
        try:
            assert future.result(timeout=SANITY_S) in (2, 4, 6)
        except BatcherClosed:
            pass
    with pytest.raises(BatcherClosed):
        batcher.submit([4])


def test_a_full_queue_refuses_the_whole_submission(batchers):
    gate = threading.Event()
    recorder = Recorder(gate)
    batcher, first = hold_device(batchers, recorder, max_batch_size=2, max_wait_s=0.0, max_queue_size=4)
    accepted = batcher.submit([1, 2, 3])
    with pytest.raises(QueueFullError):
        batcher.submit([4, 5])
    gate.set()
    assert results(accepted) == [2, 4, 6]
    results(first)


def test_cancelled_items_are_not_run(batchers):
    gate = threading.Event()
    recorder = Recorder(gate)
    batcher, first = hold_device(batchers, recorder, max_batch_size=8, max_wait_s=0.005)
    keep, drop = batcher.submit([1, 2])
    assert drop.cancel()
    gate.set()
    assert keep.result(timeout=SANITY_S) == 2
    results(first)
    assert [p for batch in recorder.batches[1:] for p in batch] == [1]


# --- out of memory -----------------------------------------------------------------------

def test_out_of_memory_splits_the_batch_and_caps_later_batches(batchers):
    torch = pytest.importorskip("torch")
    gate = threading.Event()
    blocker = Recorder(gate)
    sizes: list[int] = []
    hook_calls = []

    def run(payloads, info):
        if payloads == [-1]:
            return blocker(payloads, info)
        sizes.append(len(payloads))
        if len(payloads) > 4:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(payloads)} GiB")
        return [p * 2 for p in payloads]

    batcher, first = hold_device(batchers, _Adapter(run, blocker), max_batch_size=32, max_wait_s=0.005,
                                 on_out_of_memory=lambda: hook_calls.append(1))
    futures = [batcher.submit([n])[0] for n in range(32)]
    gate.set()
    results(first)
    assert results(futures) == [2 * n for n in range(32)]  # every job still succeeds
    stats = batcher.stats
    assert stats.out_of_memory >= 1 and stats.splits >= 1
    assert len(hook_calls) == stats.out_of_memory
    assert stats.batch_size_cap <= 4
    sizes.clear()
    results(batcher.submit(list(range(20))))  # later batches start at the size that fitted
    assert max(sizes) <= 4


def test_an_item_too_big_even_alone_fails_with_out_of_memory_and_the_batcher_lives(batchers):
    torch = pytest.importorskip("torch")

    def run(payloads, info):
        if "huge" in payloads:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return [len(p) for p in payloads]

    batcher = batchers(run, max_batch_size=8, max_wait_s=0.0)
    small, huge, other = batcher.submit(["ab", "huge", "abc"])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        huge.result(timeout=SANITY_S)
    assert small.result(timeout=SANITY_S) == 2 and other.result(timeout=SANITY_S) == 3
    assert results(batcher.submit(["abcd"])) == [4]


# --- statistics ----------------------------------------------------------------------------

def test_stats_snapshot_is_json_and_splits_queue_from_compute_time(batchers):
    batcher = batchers(Recorder(), max_batch_size=4, max_wait_s=0.001)
    results(batcher.submit(list(range(10))))
    snapshot = batcher.stats_snapshot()
    json.dumps(snapshot)
    assert snapshot["items"] == 10 and snapshot["batches"] >= 3
    assert snapshot["mean_batch_size"] == pytest.approx(10 / snapshot["batches"])
    assert snapshot["queue_wait_s"] >= 0 and snapshot["compute_s"] >= 0
    assert sum(snapshot["dispatch"].values()) == snapshot["batches"]
    assert snapshot["max_batch_size"] == 4 and snapshot["wait_policy"] == "adaptive"


def test_each_item_carries_its_submitters_context_into_the_batch(batchers):
    gate = threading.Event()
    recorder = Recorder(gate)
    batcher, first = hold_device(batchers, recorder, max_batch_size=8, max_wait_s=0.005)
    a = batcher.submit([1, 2], context="job-a")
    b = batcher.submit([3], context="job-b")
    gate.set()
    results(first + a + b)
    info = recorder.infos[1]
    assert sorted(zip(recorder.batches[1], info.contexts)) == [(1, "job-a"), (2, "job-a"), (3, "job-b")]
