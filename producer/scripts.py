"""The Lua scripts the clients run in Redis, each one atomic step of the job life cycle.

Register a script on a client with ``client.register_script(SOURCE)`` (sync or asyncio); the
call sends EVALSHA (and loads the script once if Redis does not know it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from producer import keys
from producer.core.jobs import JobPlan, result_key

#: Record a batch of jobs, all or nothing. KEYS: the pending set, the idempotency key (the pending
#: set again when there is none), then per job its record and its result key. ARGV[1]: JSON
#: ``{"ttl": s, "at": "<submitted_at>", "idem": {"hash", "window"} | null,
#: "jobs": [{"id", "check": bool, "fields"}]}``; ``check``: the caller chose the id, look for it first.
#: Replies ``{"ok"}``; ``{"same", job id}`` (the key is bound to this very request: nothing written);
#: ``{"idempotency_conflict", job id}``; ``{"job_id_conflict", job id}`` (a record or a result exists).
CLAIM_JOBS = """
local spec = cjson.decode(ARGV[1])
if spec.idem ~= cjson.null then
  local bound = redis.call('GET', KEYS[2])
  if bound then
    local sep = string.find(bound, ' ', 1, true)
    local job = sep and string.sub(bound, sep + 1) or bound
    if sep and string.sub(bound, 1, sep - 1) == spec.idem.hash then
      return {'same', job}
    end
    return {'idempotency_conflict', job}
  end
end
for i, job in ipairs(spec.jobs) do
  if job.check and redis.call('EXISTS', KEYS[1 + 2 * i], KEYS[2 + 2 * i]) > 0 then
    return {'job_id_conflict', job.id}
  end
end
local pending = {}
for i, job in ipairs(spec.jobs) do
  redis.call('HSET', KEYS[1 + 2 * i], unpack(job.fields))
  redis.call('EXPIRE', KEYS[1 + 2 * i], spec.ttl)
  pending[#pending + 1] = spec.at
  pending[#pending + 1] = job.id
end
redis.call('ZADD', KEYS[1], unpack(pending))
if spec.idem ~= cjson.null then
  redis.call('SET', KEYS[2], spec.idem.hash .. ' ' .. spec.jobs[1].id, 'EX', spec.idem.window)
end
return {'ok'}
"""

#: Undo ``CLAIM_JOBS`` for jobs whose message was never sent. KEYS: the pending set, the
#: idempotency key (or the pending set again), then the jobs' records. ARGV[1]: JSON
#: ``{"ids": [...], "idem": "<hash> <job id>" | null}``; the key is deleted only if still bound so.
RELEASE_JOBS = """
local spec = cjson.decode(ARGV[1])
for i, id in ipairs(spec.ids) do
  redis.call('DEL', KEYS[2 + i])
  redis.call('ZREM', KEYS[1], id)
end
if spec.idem ~= cjson.null and redis.call('GET', KEYS[2]) == spec.idem then
  redis.call('DEL', KEYS[2])
end
return #spec.ids
"""

#: Store the REVOKED marker of a job no worker started, unless a result or state is stored already.
#: KEYS: result key, pending set, job record, token stream. ARGV: job id, marker JSON, TTL (s),
#: final status word. If stored: published on the result channel, the job leaves the pending set,
#: and a streaming job's stream gets its end entry ``{"done": "1", "status": <word>}``. Replies with
#: the result object now stored (the marker, or what was there), or nil.
SETTLE_UNSTARTED = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[3]) then
  redis.call('PUBLISH', KEYS[1], ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
  if redis.call('HGET', KEYS[3], 'stream') == '1' then
    redis.call('XADD', KEYS[4], '*', 'done', '1', 'status', ARGV[4])
    redis.call('EXPIRE', KEYS[4], ARGV[3])
  end
  return ARGV[2]
end
return redis.call('GET', KEYS[1])
"""


def claim_call(plans: Sequence[JobPlan], submitted_at: float, record_ttl_s: int,
               idempotency_window_s: int) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of ``CLAIM_JOBS`` for ``plans`` (only a single-job batch may carry an idempotency key)."""
    idem_key = plans[0].idempotency_key if len(plans) == 1 else None
    spec: dict[str, Any] = {
        "ttl": record_ttl_s, "at": repr(submitted_at),
        "idem": {"hash": plans[0].fingerprint(), "window": idempotency_window_s} if idem_key else None,
        "jobs": [{"id": plan.job_id, "check": plan.chosen_id,
                  "fields": [str(item) for pair in plan.record(submitted_at).items() for item in pair]}
                 for plan in plans],
    }
    job_keys = [key for plan in plans for key in (keys.job_record(plan.job_id), result_key(plan.job_id))]
    return [keys.PENDING, keys.idempotency(idem_key) if idem_key else keys.PENDING, *job_keys], [json.dumps(spec)]


def release_call(plans: Sequence[JobPlan]) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of ``RELEASE_JOBS`` for ``plans``."""
    idem_key = plans[0].idempotency_key if len(plans) == 1 else None
    bound = f"{plans[0].fingerprint()} {plans[0].job_id}" if idem_key else None
    spec = {"ids": [plan.job_id for plan in plans], "idem": bound}
    return ([keys.PENDING, keys.idempotency(idem_key) if idem_key else keys.PENDING,
             *(keys.job_record(plan.job_id) for plan in plans)], [json.dumps(spec)])


def settle_call(job_id: str, marker: str, ttl_s: int, status: str) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of ``SETTLE_UNSTARTED`` for one job."""
    return ([result_key(job_id), keys.PENDING, keys.job_record(job_id), keys.token_stream(job_id)],
            [job_id, marker, ttl_s, status])
