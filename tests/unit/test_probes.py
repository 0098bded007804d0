"""The probe component (workers/process/probes.py) on its own: ticks, pauses, checks, HTTP answers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from workers.process.probes import Flag, Liveness, ProbeServer, Readiness


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_working_part_silent_past_its_stall_limit_is_unlive_and_a_paused_one_is_not():
    clock = Clock()
    liveness = Liveness(clock)
    liveness.expect("consumer", 60)
    liveness.expect("device", 5)
    assert liveness.check()[0], "parts start idle"
    liveness.tick("device")
    clock.now += 6
    live, details = liveness.check()
    assert not live and details["device"] == {"working": True, "silent_s": 6.0, "stall_s": 5}
    liveness.tick("device")
    liveness.pause("device")
    clock.now += 1000
    assert liveness.check()[0], "an idle part is not judged, however long it idles"
    liveness.tick("consumer")
    clock.now += 59
    assert liveness.check()[0]
    with pytest.raises(ValueError, match="stall_s must be > 0"):
        liveness.expect("x", 0)
    with pytest.raises(KeyError):
        liveness.tick("never-expected")


def test_readiness_needs_every_check_and_a_raising_check_fails():
    flag = Flag()
    readiness = Readiness()
    readiness.add("loaded", flag)
    readiness.add("redis", lambda: (_ for _ in ()).throw(ConnectionError("refused")))
    ready, details = readiness.check()
    assert not ready and details == {"loaded": False, "redis": "ConnectionError: refused"}
    readiness.add("redis", lambda: True)
    flag.set()
    assert readiness.check() == (True, {"loaded": True, "redis": True})


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_server_answers_200_or_503_with_json_and_serves_metrics_only_when_given():
    liveness, readiness, ready = Liveness(), Readiness(), Flag()
    readiness.add("consuming", ready)
    server = ProbeServer(liveness, readiness, 0, host="127.0.0.1").start()
    try:
        assert get(server.port, "/livez") == (200, b'{"ok": true}\n')
        status, body = get(server.port, "/readyz")
        assert status == 503 and json.loads(body) == {"ok": False, "consuming": False}
        ready.set()
        assert get(server.port, "/readyz")[0] == 200
        assert get(server.port, "/metrics")[0] == 404 and get(server.port, "/nope")[0] == 404
    finally:
        server.stop()
    with_metrics = ProbeServer(liveness, readiness, 0, host="127.0.0.1", metrics=lambda: b"up 1\n").start()
    try:
        assert get(with_metrics.port, "/metrics") == (200, b"up 1\n")
    finally:
        with_metrics.stop()
