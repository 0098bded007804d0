"""Chaos run: N mixed jobs while workers are SIGKILLed and restarted at random and Redis restarts.

    python -m bench.chaos --jobs 5000 --kills 10 --redis-restarts 1 --seed 1

What it does:

1. Starts a private redis-server with the append-only file on (appendfsync everysec) and
   ``--workers`` real ``fleet worker`` processes serving ``minilm`` and the demo models
   (``topics``, ``tiny-llama`` from ``fleet models init-demo``), with a short visibility
   timeout (``--visibility-timeout``, default 10 s) so that jobs of killed workers return
   in seconds.
2. Submits ``--jobs`` jobs at ``--rate`` per second through ``FleetClient``: embed,
   classify and greedy generate, plus about 5 % invalid payloads sent raw (bypassing the
   client's validation) that must end in FAILURE with a known error code. A submission
   that raises (Redis restarting) is retried as a new job; only submissions that returned
   count as submitted.
3. Meanwhile, at random moments, SIGKILLs a random worker (and starts a replacement at
   once) ``--kills`` times and restarts Redis ``--redis-restarts`` times (SIGTERM, then
   SIGKILL, alternating, unless ``--redis-signal`` says otherwise).
4. Waits until every job has a final result or nothing moved for ``--settle-timeout`` s,
   then checks every result against the same models run in this process: embeddings
   cosine >= 0.9999, classify labels equal, greedy generate text equal.
5. For every lost job, replays the append-only file of the run's Redis to tell where it was
   lost: ``popped_never_recorded`` (a BRPOP handed its message to a worker that never recorded
   it in kombu's ``unacked`` hash: the worker was SIGKILLed in between), ``never_enqueued`` or
   ``other`` (``unknown`` when the AOF cannot tell, e.g. after an AOF rewrite).

Modules: ``fleet`` (the Redis and the workers it breaks), ``workload`` (the jobs), ``checks``
(results against an in-process reference), ``aof`` (where a lost job was lost), ``run`` (the
command line and the report).

Counts printed (docs/RELIABILITY.md defines them): submitted, completed, failed as expected,
lost (of which lost in delivery and lost otherwise), wrong, failed unexpectedly, dead-lettered,
duplicated, computed twice, stored twice, crash charged, orphan results. Exit status 1 if any of
wrong, failed unexpectedly, dead-lettered, duplicated or lost otherwise is not zero, or if more
jobs were lost in delivery than workers were SIGKILLed.
"""
