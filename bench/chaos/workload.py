"""The chaos run's workload: mixed embed, classify and generate jobs, plus invalid payloads sent raw,
submitted at a fixed rate while the fleet is being broken.

About 5 % of the jobs are invalid payloads sent with a plain Celery app (bypassing the client's
validation) that must end in FAILURE with a known error code. A submission that raises (Redis
restarting) is retried as a new job; only submissions that returned count as submitted.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from producer import FleetClient
from producer.contract import TASK_CLASSIFY, TASK_EMBED, TASK_GENERATE, inference_queue
from producer.settings import FleetSettings

WORDS = ("river stone music market guitar rain storm cat dog forecast shares bank orchestra violin "
         "winter field horse quiet bright quickly slowly beneath above ancient modern little great "
         "bread harbour train station mountain garden letter window candle evening morning island").split()
PROMPTS = ["Once upon a time", "The river", "In the morning the", "She opened the door and", "The old man said",
           "A storm was", "They walked to the", "The king", "It was a dark", "Far away, beyond the hills,",
           "The cat", "Bread and", "Every evening", "The letter read", "Under the bridge"]

#: Raw payloads that must fail with this code: (task, queue model, args, kwargs, expected code).
INVALID = [
    (TASK_EMBED, "minilm", [{"texts": []}], {}, "invalid_input"),
    (TASK_EMBED, "minilm", [{"texts": ["a"], "evil": True}], {}, "invalid_input"),
    (TASK_EMBED, "minilm", [{"v": 99, "texts": ["a"]}], {}, "unsupported_protocol"),
    (TASK_EMBED, "minilm", [{"texts": ["a"], "model": "ghost"}], {}, "unknown_model"),
    (TASK_EMBED, "minilm", [{"texts": ["a"], "model": "topics"}], {}, "wrong_model_kind"),
    (TASK_EMBED, "minilm", [], {"texts": ["keyword arguments"]}, "invalid_input"),
    (TASK_EMBED, "minilm", ["not an object"], {}, "invalid_input"),
    (TASK_CLASSIFY, "topics", [{"texts": ["x"], "model": "topics", "top_k": 0}], {}, "invalid_input"),
    (TASK_GENERATE, "tiny-llama", [{"prompt": "", "model": "tiny-llama"}], {}, "invalid_input"),
    (TASK_GENERATE, "tiny-llama", [{"prompt": "hi", "model": "tiny-llama", "max_new_tokens": 100000}], {},
     "invalid_input"),
]


@dataclass
class Job:
    """One submitted job and what it must produce."""

    id: str
    kind: str  # embed | classify | generate | invalid
    request: dict[str, Any]
    expected_code: str | None = None
    submitted_at: float = 0.0  # when its submission returned: seconds since the run's clock start


def make_jobs(count: int, rng: random.Random) -> list[Job]:
    """``count`` jobs drawn from small pools of distinct requests (so references are cheap)."""
    embed_pool = [{"texts": [" ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for _ in range(rng.randint(1, 3))]}
                  for _ in range(300)]
    classify_pool = [{"texts": [" ".join(rng.choices(WORDS, k=rng.randint(3, 20)))], "top_k": rng.randint(1, 3)}
                     for _ in range(150)]
    generate_pool = [{"prompt": prompt, "max_new_tokens": rng.randint(4, 24)} for prompt in PROMPTS]
    jobs = []
    for _ in range(count):
        draw = rng.random()
        if draw < 0.05:
            jobs.append(Job("", "invalid", {"case": rng.randrange(len(INVALID))}))
        elif draw < 0.62:
            jobs.append(Job("", "embed", dict(rng.choice(embed_pool))))
        elif draw < 0.90:
            jobs.append(Job("", "classify", dict(rng.choice(classify_pool))))
        else:
            jobs.append(Job("", "generate", dict(rng.choice(generate_pool))))
    return jobs


class Submitter(threading.Thread):
    """Submits ``jobs`` at ``rate`` per second; retries a submission that raised as a new job."""

    def __init__(self, jobs: list[Job], rate: float, settings: FleetSettings, clock_start: float):
        super().__init__(name="chaos-submitter", daemon=True)
        self.jobs, self.rate, self.settings, self.clock_start = jobs, rate, settings, clock_start
        self.submitted: list[Job] = []
        self.submit_errors: Counter[str] = Counter()
        self.done = threading.Event()

    def run(self) -> None:
        from celery import Celery

        from producer.celery_config import celery_config

        raw_app = Celery("chaos-raw", set_as_current=False)
        config = celery_config(self.settings)
        config.pop("result_backend", None)
        raw_app.conf.update(config)
        with FleetClient(settings=self.settings) as client:
            started = time.monotonic()
            for index, job in enumerate(self.jobs):
                delay = started + index / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                for attempt in range(60):
                    try:
                        job.id = self._submit(client, raw_app, job)
                        job.submitted_at = time.monotonic() - self.clock_start
                        self.submitted.append(job)
                        break
                    except Exception as exc:  # noqa: BLE001 - Redis restarting: retry as a new job
                        self.submit_errors[type(exc).__name__] += 1
                        time.sleep(min(2.0, 0.2 * (attempt + 1)))
        raw_app.close()
        self.done.set()

    @staticmethod
    def _submit(client: FleetClient, raw_app, job: Job) -> str:
        if job.kind == "embed":
            return client.embed(job.request["texts"]).id
        if job.kind == "classify":
            return client.classify(job.request["texts"], model="topics", top_k=job.request["top_k"]).id
        if job.kind == "generate":
            return client.generate(job.request["prompt"], model="tiny-llama", temperature=0,
                                   max_new_tokens=job.request["max_new_tokens"]).id
        task, model, args, kwargs, code = INVALID[job.request["case"]]
        job.expected_code = code
        kind = task.split(".")[1]
        job_id = str(uuid.uuid4())
        raw_app.send_task(task, args=args, kwargs=kwargs, task_id=job_id, queue=inference_queue(kind, model))
        return job_id
