"""The Flower dashboard in a real browser: `fleet up --devices cpu --flower` on a private Redis.

Flower runs with HTTP basic auth (``FLOWER_BASIC_AUTH``, as every shipped config sets it): a
browser without credentials is refused (401); one that logs in sees the dashboard. A real
worker serves embed jobs submitted with FleetClient; Debian Chromium, driven by
Playwright, must list the worker as online on Flower's workers page and show every job as
`fleet.embed`, SUCCESS, run by that worker on the tasks page. `fleet up` must restart a
killed Flower, and stop it when it stops.

Set FLEET_FLOWER_SCREENSHOT=<path> to keep the tasks page screenshot there (this is how
docs/img/flower.png is made); otherwise it goes to a temporary directory.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

from producer import FleetClient
from tests.support.fleet_processes import REPO_ROOT, fleet_executable, wait_for
from workers.process.embedded_redis import RedisServer, free_port
from workers.process.health import probe

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Generous bounds for slow machines (loading the model on 2 cores); none is a performance check.
START_TIMEOUT_S = 240
PAGE_TIMEOUT_MS = 60_000
#: The dashboard's login for this test (Flower's basic auth, "user:password").
FLOWER_USER, FLOWER_PASSWORD = "fleet-admin", secrets.token_urlsafe(12)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian Chromium (/usr/bin/chromium) is not installed: "
                                                     "apt-get install chromium (.ci/run does)"),
]


def flower_healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/healthcheck", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture()
def fleet_with_flower(tmp_path):
    """`fleet up --devices cpu --models minilm --flower` on its own redis-server, ready to serve."""
    server = RedisServer().start()
    port = free_port()
    worker = f"fleet-cpu0@flower-test-{os.getpid()}"
    log_path = tmp_path / "up.log"
    log = log_path.open("w")
    env = {**os.environ, "REDIS_URL": server.url, "FLEET_HOSTNAME": worker.partition("@")[2],
           "FLEET_TORCH_THREADS": "1", "FLEET_CONCURRENCY": "8", "HF_HUB_OFFLINE": "1",
           "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"}
    process = subprocess.Popen([*fleet_executable(), "up", "--devices", "cpu", "--models", "minilm",
                                "--flower", "--flower-port", str(port)],
                               env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    client = redis.Redis.from_url(server.url)
    try:
        wait_for(lambda: process.poll() is not None or (probe(client, worker=worker)[0] and flower_healthy(base_url)),
                 START_TIMEOUT_S, "the worker to be ready and Flower to answer")
        assert process.poll() is None, f"fleet up exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
        yield {"process": process, "redis_url": server.url, "flower": base_url, "port": port, "worker": worker,
               "log": log_path}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        client.close()
        server.stop()


def flower_pids(log_path: Path) -> list[int]:
    """Pids of the Flower processes `fleet up` started, in order, from its log."""
    return [int(pid) for pid in re.findall(r"started flower \(pid (\d+)\)", log_path.read_text())]


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def login_refused(page, url: str) -> bool:
    """True if Flower refuses ``url`` to this page's credentials: a 401, or Chromium's auth error for it."""
    try:
        return page.goto(url).status == 401
    except PlaywrightError as exc:
        return "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)


def succeeded_rows(page, tasks_url: str, job_ids: list[str]) -> bool:
    """Load the tasks page afresh; True once every job's row carries the SUCCESS badge."""
    page.goto(tasks_url, wait_until="networkidle")
    return all(page.locator(f'#tasks-table tr[id="{job_id}"] .badge').all_inner_texts() == ["SUCCESS"]
               for job_id in job_ids)


def test_flower_behind_auth_lists_the_worker_and_its_succeeded_embed_jobs(fleet_with_flower, tmp_path):
    flower, worker = fleet_with_flower["flower"], fleet_with_flower["worker"]
    screenshot = Path(os.environ.get("FLEET_FLOWER_SCREENSHOT") or tmp_path / "flower.png")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            assert login_refused(browser.new_page(), f"{flower}/workers")
            assert login_refused(browser.new_page(http_credentials={"username": FLOWER_USER, "password": "wrong"}),
                                 f"{flower}/workers")

            page = browser.new_page(viewport={"width": 1440, "height": 720},
                                    http_credentials={"username": FLOWER_USER, "password": FLOWER_PASSWORD})
            assert page.goto(f"{flower}/workers").status == 200
            worker_row = page.locator("#workers-table tbody tr", has_text=worker)
            expect(worker_row).to_have_count(1, timeout=PAGE_TIMEOUT_MS)
            expect(worker_row.locator(".badge")).to_have_text("Online")

            # Flower records only the tasks whose events arrive while it listens: it does now,
            # since it lists the worker from that worker's heartbeat events.
            with FleetClient(fleet_with_flower["redis_url"]) as client:
                handles = [client.embed([f"sentence {i} for the dashboard"]) for i in range(5)]
                assert all(handle.result(timeout=120).dim == 384 for handle in handles)
            job_ids = [handle.id for handle in handles]

            tasks_url = f"{flower}/tasks"
            wait_for(lambda: succeeded_rows(page, tasks_url, job_ids), 60, "Flower to show the jobs as succeeded")
            for job_id in job_ids:
                row = page.locator(f'#tasks-table tr[id="{job_id}"]')
                expect(row.get_by_role("link", name="fleet.embed", exact=True)).to_have_count(1)
                expect(row).to_contain_text(worker)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    assert screenshot.read_bytes().startswith(b"\x89PNG")

    [first] = flower_pids(fleet_with_flower["log"])
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(flower_pids(fleet_with_flower["log"])) == 2 and flower_healthy(flower), 60,
             "fleet up to restart Flower")

    process = fleet_with_flower["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 0
    with pytest.raises(ConnectionRefusedError):  # `fleet up` stopped its Flower child too
        socket.create_connection(("127.0.0.1", fleet_with_flower["port"]), timeout=5).close()
