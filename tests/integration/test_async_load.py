"""AsyncFleetClient under load: 2,000 results awaited at once, none failing, on a bounded set of connections.

The first async client raised ``MaxConnectionsError`` for a third to a half of 150-200 concurrent
``await handle.result()`` calls (one MGET connection per wait); the jobs had all succeeded.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis

from producer import AsyncFleetClient, FleetClient
from producer.settings import FleetSettings

pytestmark = pytest.mark.integration

#: Command connections the client under test may use; it gets one more for its subscription.
SLOTS = 4


class ConnectionCounter(threading.Thread):
    """Samples ``CLIENT LIST`` until stopped; ``most`` is the largest number of connections named ``name``."""

    def __init__(self, redis_url: str, name: str):
        super().__init__(daemon=True)
        self._client = redis.Redis.from_url(redis_url)
        self._name = name
        self._finished = threading.Event()
        self.most = 0
        self.start()

    def run(self) -> None:
        while not self._finished.wait(0.05):
            named = sum(1 for entry in self._client.client_list() if entry.get("name") == self._name)
            self.most = max(self.most, named)

    def stop(self) -> int:
        self._finished.set()
        self.join(10)
        self._client.close()
        return self.most


def test_two_thousand_results_awaited_at_once_all_arrive(embed_worker, redis_url):
    with FleetClient(redis_url) as other:  # jobs of another client: this one follows them by id
        foreign_ids = [handle.id for handle in other.embed_many([[f"someone else's {n}"] for n in range(500)])]

    async def main():
        async with AsyncFleetClient(settings=FleetSettings(redis_url=redis_url, async_max_connections=SLOTS)) as fleet:
            own = await fleet.embed_many([[f"load {n}"] for n in range(1500)])
            handles = own + [fleet.job(job_id) for job_id in foreign_ids]
            counter = ConnectionCounter(redis_url, f"{fleet.name}-wait")
            try:
                outcomes = await asyncio.gather(*(handle.result(timeout=600) for handle in handles),
                                                return_exceptions=True)
            finally:
                most = counter.stop()
            return outcomes, most

    outcomes, most_connections = asyncio.run(main())
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert failures == [], f"{len(failures)} of {len(outcomes)} waits failed, e.g. {failures[:3]}"
    assert len(outcomes) == 2000 and {result.dim for result in outcomes} == {384}
    assert 1 <= most_connections <= SLOTS + 1, most_connections
