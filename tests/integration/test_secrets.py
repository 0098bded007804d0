"""Redis AUTH, ACL users and TLS: workers and clients connect with credentials in ``REDIS_URL``,
and no secret appears in any log line or command output.

docs/RELIABILITY.md ("Security") documents the URL forms and the least-privilege ACL that
``test_least_privilege_acl_user_runs_the_whole_path`` proves sufficient.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from producer import FleetClient, JobFailedError
from producer.settings import FleetSettings
from tests.support.fleet_processes import WorkerProcess, fleet_executable
from tests.support.redis_topology import AuthRedisServer
from workers.commands.exit_codes import ExitCode
from workers.process.embedded_redis import free_port, redis_server_binary

pytestmark = pytest.mark.integration

DEFAULT_PASSWORD = "default-Pw-9f3c1e"  # the ``default`` user's (requirepass)
FLEET_PASSWORD = "fleet-Pw-a7/b+c@d"  # an ACL user's; characters that need URL-encoding on purpose
#: Least privilege that runs every Fleet path (worker, client, results, events, status, health,
#: DLQ): all keys (``~*``) and pub/sub channels (``&*``, results and events use them), every
#: command except the ``@dangerous`` ones (FLUSHALL, KEYS, CONFIG, DEBUG, SHUTDOWN, CLIENT KILL,
#: ...). redis-py's optional ``CLIENT SETINFO`` on connect is refused and ignored.
FLEET_ACL = "~* &* +@all -@dangerous"


def _secrets_in(text: str, *secrets: str) -> list[str]:
    """Which of ``secrets`` (plain or URL-encoded) occur in ``text``."""
    found = []
    for secret in secrets:
        if secret in text or quote(secret, safe="") in text:
            found.append(secret)
    return found


def _fleet(command: list[str], redis_url: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*fleet_executable(), *command], env={**os.environ, "REDIS_URL": redis_url, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def acl_redis():
    server = AuthRedisServer(DEFAULT_PASSWORD, username="fleet", acl_users=[("fleet", FLEET_PASSWORD, FLEET_ACL)])
    server.start()
    yield server
    server.stop()


def test_redis_refuses_clients_without_credentials(acl_redis):
    anonymous = redis.Redis(host="127.0.0.1", port=acl_redis.port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    assert redis.Redis.from_url(acl_redis.url_for("fleet")).ping()
    with pytest.raises(redis.exceptions.NoPermissionError):  # the ACL takes dangerous commands away
        redis.Redis.from_url(acl_redis.url_for("fleet")).flushall()


def test_least_privilege_acl_user_runs_the_whole_path_and_no_secret_is_logged(acl_redis, tmp_path):
    url = acl_redis.url_for("fleet")
    assert FLEET_PASSWORD not in url and quote(FLEET_PASSWORD, safe="") in url
    worker = WorkerProcess(url, "--device", "cpu", "--models", "minilm", name="secrets-worker",
                           env={"FLEET_CONCURRENCY": "4"})
    outputs: list[str] = []
    try:
        worker.wait_ready()
        with FleetClient(settings=FleetSettings(redis_url=url)) as client:
            assert client.embed(["authenticated job"]).result(timeout=60).dim == 384
            # A failing job logs its error path too.
            raw_app = client.celery
            failed = raw_app.send_task("fleet.embed", args=[{"texts": []}], queue="fleet.embed.minilm")
            failed.get(timeout=60, propagate=False)
            assert failed.state == "FAILURE"
            with pytest.raises(JobFailedError):
                client.job(failed.id).result(timeout=60)
        for command in (["status"], ["health", "--worker", worker.name], ["health", "--live", "--worker", worker.name],
                        ["dlq", "list"]):
            done = _fleet(command, url)
            outputs.append(f"$ fleet {' '.join(command)}\n{done.stdout}{done.stderr}")
            if command[0] == "health":
                assert done.returncode == 0, done.stdout + done.stderr
        # A client with a wrong password: the error names the problem, not the password.
        wrong = _fleet(["health"], acl_redis.url_for("fleet", "not-the-Pw-123"))
        outputs.append(wrong.stdout + wrong.stderr)
        assert wrong.returncode == ExitCode.CONFIG and "refused the credentials" in wrong.stderr
        assert "not-the-Pw-123" not in wrong.stdout + wrong.stderr
    finally:
        worker.stop()
    log = worker.log()
    assert "Connected to redis://fleet:**@" in log  # Celery masks the password in its own lines
    everything = log + "\n".join(outputs)
    assert _secrets_in(everything, FLEET_PASSWORD, DEFAULT_PASSWORD) == [], "a secret was logged or printed"


def test_worker_with_a_wrong_password_stops_without_printing_it(acl_redis):
    wrong_password = "wrong-Pw-5e6f7a"
    worker = WorkerProcess(acl_redis.url_for("fleet", wrong_password), "--device", "cpu", "--models", "minilm",
                           name="secrets-wrong")
    try:
        deadline = time.monotonic() + 120
        while worker.alive() and time.monotonic() < deadline:
            if "invalid username-password" in worker.log().lower() or "WRONGPASS" in worker.log():
                break
            time.sleep(0.2)
    finally:
        worker.stop(signal.SIGTERM, timeout_s=30)
    log = worker.log()
    assert "WRONGPASS" in log or "invalid username-password" in log.lower(), log[-3000:]
    assert _secrets_in(log, wrong_password, FLEET_PASSWORD, DEFAULT_PASSWORD) == []


# --- TLS ----------------------------------------------------------------------------------

def _redis_has_tls() -> bool:
    probe = subprocess.run([redis_server_binary(), "--port", "0", "--tls-port", "1", "--loglevel", "warning"],
                           capture_output=True, text=True, timeout=10)
    return "No tls-cert-file configured" in probe.stdout + probe.stderr


def _make_certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=fleet-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.crt", "-days", "2",
        "-subj", "/CN=some-other-ca")
    return {"ca": directory / "ca.crt", "server": directory / "server.crt", "server_key": directory / "server.key",
            "other": directory / "other.crt"}


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    if shutil.which("openssl") is None or not _redis_has_tls():
        pytest.skip("redis-server without TLS support or no openssl")
    directory = tmp_path_factory.mktemp("tls")
    certs = _make_certificates(directory)
    port = free_port()
    process = subprocess.Popen([redis_server_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                                "--tls-cert-file", str(certs["server"]), "--tls-key-file", str(certs["server_key"]),
                                "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no",
                                "--requirepass", DEFAULT_PASSWORD, "--save", "", "--appendonly", "no",
                                "--dir", str(directory), "--maxmemory-policy", "noeviction"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def url(ca: Path) -> str:
        return (f"rediss://:{quote(DEFAULT_PASSWORD, safe='')}@127.0.0.1:{port}/0"
                f"?ssl_cert_reqs=required&ssl_ca_certs={ca}")

    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis.from_url(url(certs["ca"])).ping():
                break
        except redis.RedisError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.1)
    yield {"url": url(certs["ca"]), "untrusted_url": url(certs["other"]), "port": port}
    process.kill()
    process.wait(10)


def test_tls_worker_and_client_verify_the_server_and_log_no_secret(tls_redis):
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis.from_url(tls_redis["untrusted_url"]).ping()
    plaintext = redis.Redis(host="127.0.0.1", port=tls_redis["port"], password=DEFAULT_PASSWORD,
                            socket_timeout=2, socket_connect_timeout=2)
    with pytest.raises(redis.RedisError):
        plaintext.ping()  # the TLS port does not speak plain text
    worker = WorkerProcess(tls_redis["url"], "--device", "cpu", "--models", "minilm", name="tls-worker",
                           env={"FLEET_CONCURRENCY": "4"})
    try:
        worker.wait_ready()
        with FleetClient(settings=FleetSettings(redis_url=tls_redis["url"])) as client:
            assert client.embed(["over TLS"]).result(timeout=60).dim == 384
        status = _fleet(["status"], tls_redis["url"])
        health = _fleet(["health", "--worker", worker.name], tls_redis["url"])
        assert health.returncode == 0, health.stdout + health.stderr
    finally:
        worker.stop()
    log = worker.log()
    assert "Connected to rediss://:**@" in log
    assert _secrets_in(log + status.stdout + status.stderr + health.stdout + health.stderr, DEFAULT_PASSWORD) == []
