"""The continuous-batching engine with the demo's tiny Llama in-process (no Redis, no worker).

Every test runs the real model on CPU in fp32. Waits use ``SequenceHandle.wait`` with generous
timeouts; nothing asserts a duration.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.serving.generation.engine import EngineClosed, GenerationEngine
from workers.serving.generation.hooks import EngineHooks
from workers.serving.generation.limits import EngineLimits, PromptTooLong
from workers.serving.generation.sampling import Sampling
from workers.serving.generation.sequence import Finish

WAIT_S = 120

PROMPTS = ["The Fox and the Grapes. " * (1 + i % 5) + "Once upon a time"[: 3 + i] for i in range(16)]
NEW_TOKENS = [5 + (i * 11) % 45 for i in range(16)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, one_thread):
    from workers.serving.models.demo_models import write_tiny_llama

    directory = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


class StepLog(EngineHooks):
    """Records every step and first token (the hooks run on the decode thread)."""

    def __init__(self):
        self.steps = []
        self.first_tokens = []

    def on_step(self, model, step):
        self.steps.append(step)

    def on_first_token(self, model, job_id, ttft_s):
        self.first_tokens.append(job_id)


@pytest.fixture()
def make_engine(tiny_llama):
    engines = []

    def make(max_sequences=16, kv_cache_tokens=None, max_seq_len=1024, max_prompt_tokens=None, hooks=None,
             eos_token_ids=None):
        """An engine on the tiny Llama; ``eos_token_ids=()`` where a test needs exact lengths."""
        model, tokenizer = tiny_llama
        limits = EngineLimits(max_sequences=max_sequences, max_seq_len=max_seq_len,
                              max_prompt_tokens=max_prompt_tokens or max_seq_len - 1,
                              kv_cache_tokens=kv_cache_tokens or max_sequences * max_seq_len)
        engine = GenerationEngine(model, tokenizer, limits, name="tiny-llama", hooks=hooks, eos_token_ids=eos_token_ids)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def run_alone(engine, prompt, sampling):
    return engine.submit(f"alone-{time.monotonic_ns()}", prompt, sampling).wait(WAIT_S)


def test_sixteen_batched_sequences_get_exactly_their_text_alone(make_engine):
    log = StepLog()
    engine = make_engine(max_sequences=16, hooks=log)
    alone = [run_alone(engine, prompt, Sampling(max_new_tokens=n)) for prompt, n in zip(PROMPTS, NEW_TOKENS)]
    log.steps.clear()
    handles = [engine.submit(f"job-{i}", prompt, Sampling(max_new_tokens=n))
               for i, (prompt, n) in enumerate(zip(PROMPTS, NEW_TOKENS))]
    batched = [handle.wait(WAIT_S) for handle in handles]
    assert max(step.sequences for step in log.steps if step.kind == "decode") > 8  # they really shared steps
    assert [o.finish for o in batched] == [o.finish for o in alone]
    assert [o.tokens_generated for o in batched] == [o.tokens_generated for o in alone]
    assert [o.text for o in batched] == [o.text for o in alone]
    assert all(o.finish.completed and o.text for o in batched)


def test_greedy_text_equals_transformers_generate(make_engine, tiny_llama):
    model, tokenizer = tiny_llama
    engine = make_engine()
    prompt = PROMPTS[3]
    outcome = run_alone(engine, prompt, Sampling(max_new_tokens=24))
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        reference = model.generate(**ids, max_new_tokens=24, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    if tokenizer.eos_token_id in reference:
        reference = reference[:reference.index(tokenizer.eos_token_id)]
    assert outcome.text == tokenizer.decode(reference, skip_special_tokens=True)
    assert outcome.tokens_generated == len(reference)


def test_the_engine_never_holds_more_sequences_than_its_limit(make_engine):
    log = StepLog()
    engine = make_engine(max_sequences=3, hooks=log)
    handles = [engine.submit(f"job-{i}", PROMPTS[i], Sampling(max_new_tokens=12)) for i in range(10)]
    assert all(handle.wait(WAIT_S).finish.completed for handle in handles)
    assert max(step.sequences for step in log.steps) == 3
    assert sum(engine.stats()["finished"].values()) == 10


def test_the_kv_budget_bounds_the_batch(make_engine):
    log = StepLog()
    prompt = "The Lion and the Mouse."
    probe = make_engine()
    reach = len(probe.prompt_ids(prompt, 20)) + 20  # the most positions one such sequence can take
    budget = 2 * reach + reach // 2  # room for two of them, not three
    engine = make_engine(max_sequences=8, kv_cache_tokens=budget, max_seq_len=reach, hooks=log, eos_token_ids=())
    handles = [engine.submit(f"job-{i}", prompt, Sampling(max_new_tokens=20)) for i in range(6)]
    assert all(handle.wait(WAIT_S).finish.completed for handle in handles)
    assert max(step.sequences for step in log.steps) == 2
    assert max(step.kv_positions for step in log.steps) <= budget


def test_cancel_frees_the_slot_at_the_next_step_while_others_continue(make_engine):
    engine = make_engine(max_sequences=2, eos_token_ids=())
    started = threading.Event()
    first = engine.submit("first", PROMPTS[0], Sampling(max_new_tokens=500), on_piece=lambda _: started.set())
    second = engine.submit("second", PROMPTS[1], Sampling(max_new_tokens=500))
    waiting = engine.submit("waiting", PROMPTS[2], Sampling(max_new_tokens=8))
    assert started.wait(WAIT_S)
    assert engine.cancel("first")
    cancelled = first.wait(WAIT_S)
    assert cancelled.finish is Finish.CANCELLED and cancelled.tokens_generated < 500
    assert waiting.wait(WAIT_S).finish.completed  # it took the freed slot ...
    assert second.wait(0) is None  # ... while the other long sequence still runs
    complete = second.wait(WAIT_S)
    assert complete.finish is Finish.LENGTH and complete.tokens_generated == 500
    assert engine.stats()["sequences_running"] == 0 and engine.stats()["kv_positions"] == 0


def test_cancel_of_a_waiting_sequence_ends_it_without_running_it(make_engine):
    engine = make_engine(max_sequences=1, eos_token_ids=())
    running = engine.submit("running", PROMPTS[0], Sampling(max_new_tokens=300))
    queued = engine.submit("queued", PROMPTS[1], Sampling(max_new_tokens=8))
    assert engine.cancel("queued")
    outcome = queued.wait(WAIT_S)
    assert outcome.finish is Finish.CANCELLED and outcome.tokens_generated == 0 and outcome.queued_s is None
    assert running.wait(WAIT_S).finish is Finish.LENGTH
    assert not engine.cancel("queued")  # no longer held


def test_a_stop_string_ends_only_its_own_sequence(make_engine):
    engine = make_engine()
    full = run_alone(engine, PROMPTS[5], Sampling(max_new_tokens=40)).text
    stop = full[len(full) // 2:len(full) // 2 + 5]
    pieces = []
    stopped = engine.submit("stopped", PROMPTS[5], Sampling(max_new_tokens=40, stop=(stop,)), on_piece=pieces.append)
    other = engine.submit("other", PROMPTS[5], Sampling(max_new_tokens=40))
    stopped_outcome, other_outcome = stopped.wait(WAIT_S), other.wait(WAIT_S)
    assert stopped_outcome.finish is Finish.STOP
    assert stopped_outcome.text == full[:full.index(stop)]
    assert "".join(pieces) == stopped_outcome.text  # the stream never showed what the stop cut
    assert other_outcome.finish is Finish.LENGTH and other_outcome.text == full


def test_a_seeded_sequence_draws_from_its_own_generator(make_engine):
    engine = make_engine()
    sampling = Sampling(max_new_tokens=30, temperature=0.9, top_p=0.9, seed=7)
    alone = run_alone(engine, PROMPTS[2], sampling).text
    neighbours = [engine.submit(f"n{i}", PROMPTS[i], Sampling(max_new_tokens=30, temperature=1.0, seed=i))
                  for i in range(6)]
    batched = engine.submit("seeded", PROMPTS[2], sampling)
    assert batched.wait(WAIT_S).text == alone
    assert run_alone(engine, PROMPTS[2], Sampling(max_new_tokens=30, temperature=0.9, top_p=0.9, seed=8)).text != alone
    assert all(handle.wait(WAIT_S).finish.completed for handle in neighbours)


def test_priority_orders_the_waiting_sequences(make_engine):
    log = StepLog()
    engine = make_engine(max_sequences=1, hooks=log, eos_token_ids=())
    started = threading.Event()
    engine.submit("running", PROMPTS[0], Sampling(max_new_tokens=200), on_piece=lambda _: started.set())
    assert started.wait(WAIT_S)
    handles = [engine.submit("bulk", PROMPTS[1], Sampling(max_new_tokens=4), priority=6),
               engine.submit("interactive", PROMPTS[1], Sampling(max_new_tokens=4), priority=0),
               engine.submit("default", PROMPTS[1], Sampling(max_new_tokens=4), priority=3)]
    assert all(handle.wait(WAIT_S).finish.completed for handle in handles)
    assert log.first_tokens[-3:] == ["interactive", "default", "bulk"]


def test_a_deadline_that_passes_while_waiting_expires_the_sequence(make_engine):
    engine = make_engine(max_sequences=1, eos_token_ids=())
    running = engine.submit("running", PROMPTS[0], Sampling(max_new_tokens=900))
    late = engine.submit("late", PROMPTS[1], Sampling(max_new_tokens=8), deadline=time.time() + 0.3)
    outcome = late.wait(WAIT_S)
    assert outcome.finish is Finish.EXPIRED and outcome.tokens_generated == 0
    assert running.wait(0) is None  # it expired while the running sequence still held the only slot
    assert running.wait(WAIT_S).finish is Finish.LENGTH


def test_close_drains_running_sequences_and_hands_back_waiting_ones(make_engine):
    engine = make_engine(max_sequences=1, eos_token_ids=())
    done = []
    started = threading.Event()
    running = engine.submit("running", PROMPTS[0], Sampling(max_new_tokens=30), on_done=done.append,
                            on_piece=lambda _: started.set())
    waiting = engine.submit("waiting", PROMPTS[1], Sampling(max_new_tokens=30), on_done=done.append)
    assert started.wait(WAIT_S)
    assert engine.close(drain_s=WAIT_S) == ["waiting"]
    assert running.wait(0).finish is Finish.LENGTH
    assert waiting.wait(0).finish is Finish.HANDED_BACK
    assert sorted(outcome.job_id for outcome in done) == ["running", "waiting"]  # on_done exactly once each
    with pytest.raises(EngineClosed):
        engine.submit("late", PROMPTS[0], Sampling(max_new_tokens=4))


def test_close_hands_back_running_sequences_after_the_grace_period(make_engine):
    engine = make_engine(max_sequences=2, eos_token_ids=())
    started = threading.Event()
    long = engine.submit("long", PROMPTS[0], Sampling(max_new_tokens=800), on_piece=lambda _: started.set())
    assert started.wait(WAIT_S)
    assert engine.close(drain_s=0.05) == ["long"]
    outcome = long.wait(0)
    assert outcome.finish is Finish.HANDED_BACK and 0 < outcome.tokens_generated < 800


def test_a_prompt_that_does_not_fit_is_refused_with_both_numbers(make_engine, tiny_llama):
    _, tokenizer = tiny_llama
    engine = make_engine(max_seq_len=64, max_prompt_tokens=63)
    prompt = "The Fox and the Grapes. " * 10
    prompt_tokens = len(tokenizer(prompt)["input_ids"])
    assert prompt_tokens > 64 - 20
    with pytest.raises(PromptTooLong) as refused:
        engine.submit("long", prompt, Sampling(max_new_tokens=20))
    assert (refused.value.prompt_tokens, refused.value.limit) == (prompt_tokens, 44)
    assert f"{prompt_tokens} tokens" in str(refused.value) and "at most 44" in str(refused.value)
    assert engine.stats()["sequences_waiting"] == 0


def test_truncate_keeps_the_bos_token_and_the_end_of_the_prompt(make_engine, tiny_llama):
    _, tokenizer = tiny_llama
    engine = make_engine(max_seq_len=64, max_prompt_tokens=63)
    prompt = "The Fox and the Grapes. " * 10 + "The End"
    ids = tokenizer(prompt)["input_ids"]
    kept = engine.prompt_ids(prompt, max_new_tokens=20, truncate=True)
    assert len(kept) == 44
    assert kept[0] == tokenizer.bos_token_id == ids[0]
    assert kept[1:] == ids[-43:]
    outcome = engine.submit("cut", prompt, Sampling(max_new_tokens=20), truncate=True).wait(WAIT_S)
    assert outcome.finish.completed and outcome.prompt_tokens == 44


def test_a_failing_forward_pass_fails_its_sequences_and_the_engine_keeps_serving(make_engine, tiny_llama):
    model, _ = tiny_llama
    engine = make_engine()

    def broken_forward(*args, **kwargs):
        raise RuntimeError("device fell over")

    model.forward = broken_forward
    try:
        outcome = engine.submit("unlucky", PROMPTS[0], Sampling(max_new_tokens=8)).wait(WAIT_S)
    finally:
        del model.forward  # back to the class's forward
    assert outcome.finish is Finish.FAILED and "device fell over" in str(outcome.error)
    assert engine.submit("lucky", PROMPTS[0], Sampling(max_new_tokens=8)).wait(WAIT_S).finish.completed


def test_stats_report_rates_latencies_and_the_cache(make_engine):
    log = StepLog()
    engine = make_engine(hooks=log)
    handles = [engine.submit(f"job-{i}", PROMPTS[i], Sampling(max_new_tokens=16)) for i in range(4)]
    outcomes = [handle.wait(WAIT_S) for handle in handles]
    stats = engine.stats()
    assert stats["tokens_generated"] == sum(o.tokens_generated for o in outcomes)
    assert stats["ttft_s"]["count"] == 4 and stats["inter_token_s"]["count"] > 0
    assert stats["tokens_per_s"] > 0
    assert max(step.kv_bytes for step in log.steps) > 0
    assert all(o.ttft_s is not None and o.queued_s is not None and o.ttft_s >= o.queued_s for o in outcomes)


def test_a_job_id_already_held_is_refused(make_engine):
    engine = make_engine(max_sequences=1)
    engine.submit("twice", PROMPTS[0], Sampling(max_new_tokens=50))
    with pytest.raises(ValueError, match="already"):
        engine.submit("twice", PROMPTS[1], Sampling(max_new_tokens=5))
