"""Fixtures with real parts: a private redis-server per session and real worker processes."""

from __future__ import annotations

import itertools
import os

import pytest
import redis
from hypothesis import settings as hypothesis_settings

from producer import FleetClient
from tests.support.fleet_processes import WorkerProcess
from workers.process.embedded_redis import RedisServer

#: A skipped test fails the README's test command unless it is marked gpu (tests/support/no_skips.py).
pytest_plugins = ["tests.support.no_skips"]

_names = itertools.count()


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server on a free port (killed and restarted by some tests)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture()
def private_redis():
    """A Redis of this test's own, so that no session worker consumes its queues."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture()
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def embed_worker(redis_url):
    """One `fleet worker --device cpu --models minilm` for the whole session."""
    worker = WorkerProcess(redis_url, "--device", "cpu", "--models", "minilm", name=f"test-embed-{os.getpid()}",
                           env={"FLEET_CONCURRENCY": "16"})
    worker.wait_ready()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def raw_app(redis_url):
    """A plain Celery app, configured only by the wire settings: it bypasses client validation."""
    from celery import Celery

    from producer.celery_config import celery_config
    from producer.settings import FleetSettings

    app = Celery("raw-sender", set_as_current=False)
    app.conf.update(celery_config(FleetSettings(redis_url=redis_url)))
    yield app
    app.close()


@pytest.fixture(scope="module")
def one_thread():
    """The suite shares two CPU cores with other work: one torch thread avoids OpenMP oversubscription."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def client(redis_url):
    with FleetClient(redis_url) as fleet_client:
        yield fleet_client


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


@pytest.fixture(scope="session")
def demo_registry(tmp_path_factory):
    """`fleet models init-demo` output: tiny-llama, topics and the registry serving them with minilm."""
    from workers.serving.models.demo_models import init_demo

    return init_demo(tmp_path_factory.mktemp("demo-models"))


# --- Hypothesis profiles (property tests) ------------------------------------------------------------


#: ``fleet`` (the default) makes every run try the same examples (derandomized: CI is reproducible),
#: keeps no example database in the checkout, and sets no per-example deadline (a busy 2-core CI machine
#: is slow). ``FLEET_HYPOTHESIS_PROFILE=explore`` draws fresh random examples, at least 1000 per property.
hypothesis_settings.register_profile("fleet", derandomize=True, database=None, deadline=None)
hypothesis_settings.register_profile("explore", derandomize=False, database=None, deadline=None, max_examples=1000)
hypothesis_settings.load_profile(os.environ.get("FLEET_HYPOTHESIS_PROFILE", "fleet"))
