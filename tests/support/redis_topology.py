"""Redis topologies that tests start on 127.0.0.1 and free ports: password/ACL servers and
a Sentinel group (primary + replica + 3 Sentinels) that a test can fail over."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import redis

from workers.process.embedded_redis import RedisServer, free_port, redis_server_binary


class AuthRedisServer(RedisServer):
    """A ``RedisServer`` whose ``url`` carries credentials (``--requirepass`` and/or an ACL user).

    ``username`` None means the ``default`` user with ``password``. Extra ACL users go in
    ``acl_users`` as ``(name, password, rules)``, e.g. ``("fleet", "s3cret", "~* &* +@all")``.
    """

    def __init__(self, password: str, *, username: str | None = None,
                 acl_users: list[tuple[str, str, str]] | None = None, scheme: str = "redis", **kwargs):
        extra = list(kwargs.pop("extra_args", []) or [])
        extra += ["--requirepass", password]
        for name, user_password, rules in acl_users or []:
            extra += ["--user", name, "on", f">{user_password}", *rules.split()]  # one token per argument
        super().__init__(extra_args=extra, **kwargs)
        self.password = password
        self.username = username
        self.scheme = scheme
        self._acl_users = {name: user_password for name, user_password, _ in acl_users or []}

    def url_for(self, username: str | None = None, password: str | None = None) -> str:
        user = username if username is not None else (self.username or "")
        secret = password if password is not None else (self._acl_users.get(user) if user else None) or self.password
        return f"{self.scheme}://{quote(user)}:{quote(secret, safe='')}@127.0.0.1:{self.port}/0"

    @property
    def url(self) -> str:
        return self.url_for()


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (redis.RedisError, OSError) as exc:
            last_error = exc
        time.sleep(interval_s)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what} (last error: {last_error})")


class SentinelTopology:
    """A primary, one replica and ``sentinel_count`` Sentinels monitoring them as ``master_name``.

    Both data nodes run with AOF (appendfsync everysec) and ``password`` (``requirepass`` and
    ``masterauth``, so either can be primary). The Sentinels themselves have no password.
    """

    def __init__(self, master_name: str = "fleet", password: str = "topology-secret", *, sentinel_count: int = 3,
                 quorum: int = 2, down_after_ms: int = 1000, failover_timeout_ms: int = 3000):
        self.master_name = master_name
        self.password = password
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.directory = Path(tempfile.mkdtemp(prefix="fleet-sentinel-"))
        auth = ["--masterauth", password]
        self.primary = AuthRedisServer(password, appendonly=True, directory=self._dir("primary"), extra_args=auth)
        self.replica = AuthRedisServer(password, appendonly=True, directory=self._dir("replica"), extra_args=auth)
        self.sentinel_ports = [free_port() for _ in range(sentinel_count)]
        self.sentinels: list[subprocess.Popen] = []

    def _dir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def url(self) -> str:
        """``sentinel://:<password>@127.0.0.1:<port>/0;sentinel://...`` (the master's password)."""
        first, *rest = self.sentinel_ports
        return ";".join([f"sentinel://:{quote(self.password, safe='')}@127.0.0.1:{first}/0",
                         *(f"sentinel://127.0.0.1:{port}/0" for port in rest)])

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinel_ports[index], socket_timeout=2,
                           socket_connect_timeout=2)

    def master_address(self) -> tuple[str, int] | None:
        """The master's address as the first Sentinel that answers sees it."""
        for index in range(len(self.sentinel_ports)):
            client = self.sentinel_client(index)
            try:
                reply = client.execute_command("SENTINEL", "get-master-addr-by-name", self.master_name)
                if reply:
                    return reply[0].decode(), int(reply[1])
            except redis.RedisError:
                continue
            finally:
                client.close()
        return None

    def start(self, timeout_s: float = 60.0) -> SentinelTopology:
        self.primary.start()
        self.replica.extra_args += ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        replica = redis.Redis.from_url(self.replica.url)
        _wait(lambda: replica.info("replication").get("master_link_status") == "up", timeout_s, "replication link")
        replica.close()
        for port in self.sentinel_ports:
            conf = self._dir(f"sentinel-{port}") / "sentinel.conf"
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {conf.parent}",
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.primary.port} {self.quorum}",
                f"sentinel auth-pass {self.master_name} {self.password}",
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.master_name} 1", ""]))
            log = (conf.parent / "sentinel.log").open("w")
            self.sentinels.append(subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"],
                                                   stdout=log, stderr=subprocess.STDOUT))
        others = len(self.sentinel_ports) - 1

        def discovered() -> bool:  # every Sentinel knows the replica and the other Sentinels
            for index in range(len(self.sentinel_ports)):
                client = self.sentinel_client(index)
                try:
                    state = client.execute_command("SENTINEL", "master", self.master_name)
                    fields = dict(zip(state[::2], state[1::2])) if isinstance(state, list) else state
                    fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                              for k, v in fields.items()}
                    if int(fields["num-slaves"]) < 1 or int(fields["num-other-sentinels"]) < others:
                        return False
                finally:
                    client.close()
            return True

        _wait(discovered, timeout_s, "Sentinels to discover the replica and each other", 0.25)
        return self

    def kill_primary(self) -> tuple[str, int]:
        """SIGKILL the current primary (as a crash would); return its old address."""
        address = ("127.0.0.1", self.primary.port)
        assert self.primary.process is not None, "started"
        self.primary.process.kill()
        self.primary.process.wait(10)
        return address

    def wait_for_failover(self, old: tuple[str, int], timeout_s: float = 30.0) -> tuple[str, int]:
        """Wait until the Sentinels name a master other than ``old``; return it."""
        return _wait(lambda: (lambda addr: addr if addr and addr != old else None)(self.master_address()),
                     timeout_s, "the Sentinels to promote the replica", 0.1)

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        for server in (self.replica, self.primary):
            server.stop(kill=True)
        shutil.rmtree(self.directory, ignore_errors=True)
