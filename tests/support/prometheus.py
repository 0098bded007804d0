"""A real Prometheus server (Debian's ``prometheus`` package) for tests: scrape targets, rules, HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from workers.process.embedded_redis import free_port

INSTALL_HINT = "apt-get install -y prometheus (Debian's package; .ci/run installs it)"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusServer:
    """``prometheus`` on 127.0.0.1 and a free port, scraping ``targets`` every ``interval_s`` seconds
    and evaluating ``rules`` (a rules document) as often."""

    def __init__(self, targets: list[str], rules: dict[str, Any], interval_s: int = 1):
        self.directory = Path(tempfile.mkdtemp(prefix="fleet-prometheus-"))
        (self.directory / "rules.yml").write_text(yaml.safe_dump(rules))
        config = {"global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
                  "rule_files": [str(self.directory / "rules.yml")],
                  "scrape_configs": [{"job_name": "fleet-worker", "static_configs": [{"targets": targets}]}]}
        (self.directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.directory / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> PrometheusServer:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError(f"no prometheus binary: {INSTALL_HINT}")
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={self.directory / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.directory / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready in {timeout_s} s:\n{self.log_path.read_text()[-2000:]}")

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; the ``data`` of a successful answer (raises on an error answer)."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            answer = json.loads(response.read())
        if answer.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {answer}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: the result vector (empty when the expression matches nothing)."""
        return self.api("query", query=expr)["result"]

    def firing(self) -> set[str]:
        return {alert["labels"]["alertname"] for alert in self.api("alerts")["alerts"] if alert["state"] == "firing"}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        shutil.rmtree(self.directory, ignore_errors=True)
