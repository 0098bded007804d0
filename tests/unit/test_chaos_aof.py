"""The chaos bench's AOF replay (``bench.chaos.aof.where_lost``): where a lost job was lost, read from
hand-written append-only files in the layouts of Redis 7 (``appendonlydir/`` + manifest) and
Redis 6.2 (one ``appendonly.aof``). No Redis, no workers."""

from __future__ import annotations

import base64
import json

import pytest

from bench.chaos.aof import (
    IN_DELIVERY,
    NEVER_ENQUEUED,
    OTHER,
    UNKNOWN,
    ListReplay,
    classify_loss,
    iter_resp_commands,
    split_rdb_preamble,
    where_lost,
)
from bench.chaos.run import report_failed

QUEUE = b"fleet.embed.minilm\x06\x163"  # kombu's list for priority 3 of queue fleet.embed.minilm
RECORDED, IN_DELIVERY_ID, NEVER_PUSHED, RESTORED = (f"{n}0000000-0000-4000-8000-000000000000" for n in "1234")
#: What Redis 7.0.15 writes as the first base of an empty server (appendonly.aof.1.base.rdb).
EMPTY_BASE_RDB = (b"REDIS0010\xfa\tredis-ver\x067.0.15\xfa\nredis-bits\xc0@\xfa\x05ctime\xc2\x94\xc8\x08k"
                  b"\xfa\x08used-mem\xc2\xf8_\r\x00\xfa\x08aof-base\xc0\x01\xff\xabT\xff\x17Y\xb6(=")


def envelope(job_id: str, **extra_headers) -> bytes:
    """A kombu message as the Redis transport stores it (JSON envelope, base64 body)."""
    body = base64.b64encode(json.dumps([[{"texts": ["a"]}], {}, {}]).encode()).decode()
    return json.dumps({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
                       "headers": {"lang": "py", "task": "fleet.embed", "id": job_id, "root_id": job_id,
                                   **extra_headers},
                       "properties": {"correlation_id": job_id, "delivery_tag": f"tag-{job_id[0]}",
                                      "body_encoding": "base64", "priority": 3}}).encode()


def resp(*command: bytes | str) -> bytes:
    """One command as Redis writes it to the AOF."""
    parts = [c.encode() if isinstance(c, str) else c for c in command]
    return f"*{len(parts)}\r\n".encode() + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def unacked_entry(job_id: str) -> bytes:
    """What kombu's ``QoS.append`` stores in the ``unacked`` hash: [envelope, exchange, routing key]."""
    return json.dumps([json.loads(envelope(job_id)), "fleet", "fleet.embed.minilm"]).encode()


def record(job_id: str) -> bytes:
    """kombu recording a delivery: one transaction, ZADD unacked_index + HSET unacked."""
    return (resp("MULTI") + resp("ZADD", "unacked_index", "1764200000.1", f"tag-{job_id[0]}")
            + resp("HSET", "unacked", f"tag-{job_id[0]}", unacked_entry(job_id)) + resp("EXEC"))


def the_aof() -> bytes:
    """Four jobs. RECORDED: pushed, popped by a BRPOP (logged as RPOP), recorded, acked.
    IN_DELIVERY_ID: pushed, popped, never recorded. NEVER_PUSHED: absent. RESTORED: pushed, popped,
    recorded, then put back at the head by LPUSH (a requeue) and still queued."""
    return (b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n"  # written by hand: RESP exactly as in a real AOF
            + resp("HSET", f"fleet:job:{RECORDED}", "kind", "embed") + resp("PEXPIREAT", f"fleet:job:{RECORDED}", "1")
            + resp("LPUSH", QUEUE, envelope(RECORDED)) + resp("RPOP", QUEUE) + record(RECORDED)
            + resp("MULTI") + resp("ZREM", "unacked_index", "tag-1") + resp("HDEL", "unacked", "tag-1") + resp("EXEC")
            + resp("LPUSH", QUEUE, envelope(IN_DELIVERY_ID)) + resp("RPOP", QUEUE)
            + resp("LPUSH", QUEUE, envelope(RESTORED)) + resp("RPOP", QUEUE) + record(RESTORED)
            + resp("MULTI") + resp("ZREM", "unacked_index", "tag-4") + resp("HDEL", "unacked", "tag-4")
            + resp("LPUSH", QUEUE, envelope(RESTORED, redelivered=True)) + resp("EXEC")
            + resp("SET", f"celery-task-meta-{RECORDED}", '{"status": "SUCCESS"}'))


def redis7_dir(tmp_path, incr: bytes, base: bytes = EMPTY_BASE_RDB, seq: int = 1):
    """A Redis 7 data directory: appendonlydir/ with a manifest, a base file and one incr file."""
    directory = tmp_path / "appendonlydir"
    directory.mkdir(parents=True)
    (directory / f"appendonly.aof.{seq}.base.rdb").write_bytes(base)
    (directory / f"appendonly.aof.{seq}.incr.aof").write_bytes(incr)
    (directory / "appendonly.aof.manifest").write_text(f"file appendonly.aof.{seq}.base.rdb seq {seq} type b\n"
                                                       f"file appendonly.aof.{seq}.incr.aof seq {seq} type i\n")
    return tmp_path


def verdicts(redis_dir) -> dict[str, str]:
    return {job_id: where for job_id, (where, _) in
            where_lost(redis_dir, [RECORDED, IN_DELIVERY_ID, NEVER_PUSHED, RESTORED]).items()}


EXPECTED = {RECORDED: OTHER, IN_DELIVERY_ID: IN_DELIVERY, NEVER_PUSHED: NEVER_ENQUEUED, RESTORED: OTHER}


def test_each_job_is_placed_where_its_message_went_redis7_layout(tmp_path):
    assert verdicts(redis7_dir(tmp_path, the_aof())) == EXPECTED


def test_each_job_is_placed_where_its_message_went_redis62_single_file(tmp_path):
    (tmp_path / "appendonly.aof").write_bytes(the_aof())
    assert verdicts(tmp_path) == EXPECTED


def test_replay_keeps_each_jobs_history_and_the_lists(tmp_path):
    replay = ListReplay().replay(iter_resp_commands(the_aof()))
    assert [what for _, what, _ in replay.history[RECORDED]] == ["push", "pop", "recorded"]
    assert [what for _, what, _ in replay.history[IN_DELIVERY_ID]] == ["push", "pop"]
    assert [what for _, what, _ in replay.history[RESTORED]] == ["push", "pop", "recorded", "push"]
    assert NEVER_PUSHED not in replay.history
    assert [job_id for _, job_id in replay.lists[(b"0", QUEUE)]] == [RESTORED]  # still queued at the end
    assert where_lost(redis7_dir(tmp_path, the_aof()), [IN_DELIVERY_ID])[IN_DELIVERY_ID][1] == (
        r"push@14 fleet.embed.minilm\x06\x163, pop@15 fleet.embed.minilm\x06\x163")  # AOF command numbers


def test_a_message_popped_again_after_a_restore_and_not_recorded_is_lost_in_delivery():
    aof = (resp("LPUSH", QUEUE, envelope(RESTORED)) + resp("RPOP", QUEUE) + record(RESTORED)
           + resp("RPUSH", QUEUE, envelope(RESTORED, redelivered=True)) + resp("RPOP", QUEUE))
    replay = ListReplay().replay(iter_resp_commands(aof))
    assert [what for _, what, _ in replay.history[RESTORED]] == ["push", "pop", "recorded", "push", "pop"]
    assert classify_loss(replay.history[RESTORED]) == IN_DELIVERY


def test_a_command_cut_short_at_the_end_is_not_replayed():
    whole = resp("LPUSH", QUEUE, envelope(RECORDED)) + resp("RPOP", QUEUE)
    cut = resp("HSET", "unacked", "tag-1", unacked_entry(RECORDED))[:-30]  # Redis killed mid-write
    assert [command[0] for command in iter_resp_commands(whole + cut)] == [b"LPUSH", b"RPOP"]


def test_a_transaction_without_exec_at_the_end_is_not_replayed():
    aof = (resp("LPUSH", QUEUE, envelope(RECORDED)) + resp("RPOP", QUEUE) + resp("MULTI")
           + resp("ZADD", "unacked_index", "1", "tag-1") + resp("HSET", "unacked", "tag-1", unacked_entry(RECORDED)))
    replay = ListReplay().replay(iter_resp_commands(aof))
    assert [what for _, what, _ in replay.history[RECORDED]] == ["push", "pop"]
    assert classify_loss(replay.history[RECORDED]) == IN_DELIVERY


def test_lrem_ltrim_del_and_lmove_follow_redis_semantics():
    a, b, c = (envelope(j) for j in (RECORDED, IN_DELIVERY_ID, RESTORED))
    aof = (resp("RPUSH", "q", a, b, c, a) + resp("LREM", "q", "-1", a) + resp("LTRIM", "q", "1", "-1")
           + resp("LMOVE", "q", "q2", "LEFT", "RIGHT") + resp("DEL", "q2"))
    replay = ListReplay().replay(iter_resp_commands(aof))
    assert [(what, key) for _, what, key in replay.history[RECORDED]] == [
        ("push", "q"), ("push", "q"), ("removed", "q"), ("removed", "q")]
    assert [(what, key) for _, what, key in replay.history[IN_DELIVERY_ID]] == [
        ("push", "q"), ("pop", "q"), ("push", "q2"), ("removed", "q2")]
    assert classify_loss(replay.history[IN_DELIVERY_ID]) == OTHER  # LMOVE: popped and pushed in one command
    assert [(what, key) for _, what, key in replay.history[RESTORED]] == [("push", "q")]
    assert [job_id for _, job_id in replay.lists.pop((b"0", b"q"))] == [RESTORED] and not replay.lists


def test_after_an_aof_rewrite_or_with_keys_in_the_base_the_answer_is_unknown(tmp_path):
    rewritten = redis7_dir(tmp_path / "r7", the_aof(), seq=2)
    assert set(verdicts(rewritten).values()) == {UNKNOWN}
    assert "rewrite" in where_lost(rewritten, [RECORDED])[RECORDED][1]
    with_keys = EMPTY_BASE_RDB[:-9] + b"\xfe\x00\xfb\x01\x00\x00\x01q\x01a" + EMPTY_BASE_RDB[-9:]
    assert split_rdb_preamble(EMPTY_BASE_RDB) == (False, b"")
    assert split_rdb_preamble(with_keys)[0] is True
    assert set(verdicts(redis7_dir(tmp_path / "keys", the_aof(), base=with_keys)).values()) == {UNKNOWN}
    (tmp_path / "r62").mkdir()
    (tmp_path / "r62" / "appendonly.aof").write_bytes(EMPTY_BASE_RDB + the_aof())  # 6.2: preamble = rewritten
    assert set(verdicts(tmp_path / "r62").values()) == {UNKNOWN}
    (tmp_path / "none").mkdir()
    assert set(verdicts(tmp_path / "none").values()) == {UNKNOWN}


@pytest.mark.parametrize("counts, failed", [
    ({"lost": 2, "lost_in_delivery": 2, "lost_other": 0, "workers_sigkilled": 3}, False),
    ({"lost": 3, "lost_in_delivery": 3, "lost_other": 0, "workers_sigkilled": 3}, False),
    ({"lost": 4, "lost_in_delivery": 4, "lost_other": 0, "workers_sigkilled": 3}, True),
    ({"lost": 1, "lost_in_delivery": 0, "lost_other": 1, "workers_sigkilled": 3}, True),
    ({"lost": 0, "lost_in_delivery": 0, "lost_other": 0, "workers_sigkilled": 3, "duplicated": 1}, True),
    ({"lost": 1}, True),  # a report from before the AOF analysis: any loss fails
])
def test_report_fails_on_losses_other_than_one_delivery_per_kill(counts, failed):
    assert report_failed(counts) is failed
