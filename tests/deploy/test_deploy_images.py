"""Static checks of infra/docker/Dockerfile (one file, CPU or CUDA by build argument), parsed with
BuildKit's own parser, and of its constraints file.

The PyPI package ``dockerfile`` wraps the Dockerfile parser of moby/buildkit, so a file
that parses here parses for ``docker build``. No Docker engine is available on the CI
machine, so the image is not built here; docs/DEPLOY.md says what that leaves unchecked.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.support.script_modules import require_test_dependency

ROOT = Path(__file__).resolve().parents[2]

DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
CONSTRAINTS = ROOT / "infra" / "docker" / "constraints.txt"
#: Extras the image installs; the others (dev, demo...) stay out of the production image.
IMAGE_EXTRAS = ("worker", "training", "otel", "dashboard")


def parse(path: Path):
    require_test_dependency("dockerfile", "pip install dockerfile==3.4.0")
    import dockerfile

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


@pytest.fixture(scope="module")
def commands():
    return parse(DOCKERFILE)


def args_defaults(commands) -> dict[str, str]:
    out = {}
    for command in commands:
        if command.cmd == "ARG":
            for item in command.value:
                name, _, default = item.partition("=")
                out[name] = default
    return out


def test_one_dockerfile_for_cpu_and_cuda():
    assert sorted(p.name for p in DOCKERFILE.parent.glob("Dockerfile*")) == ["Dockerfile"]


def test_multi_stage_with_slim_python_311(commands):
    all_stages = stages(commands)
    assert len(all_stages) >= 2
    defaults = args_defaults(commands)
    assert defaults["PYTHON_VERSION"] == "3.11"
    for from_command, _ in all_stages:
        assert from_command.value[0].startswith("python:${PYTHON_VERSION}-slim")
    assert all_stages[0][0].value[1:] == ("AS", "build")


def test_torch_variant_picks_the_index_and_cuda_builds_are_checked(commands):
    build = stages(commands)[0][1]
    runs = [c.value[0] for c in build if c.cmd == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    extra_at = next(i for i, r in enumerate(runs) if "pip install --constraint constraints.txt" in r)
    assert torch_at < extra_at
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_at]
    assert "torch.version.cuda" in runs[torch_at] and '"${TORCH_VARIANT}" != "cpu"' in runs[torch_at]
    defaults = args_defaults(commands)
    assert defaults["TORCH_VERSION"] == "2.13.0" and defaults["TORCH_VARIANT"] == "cpu"
    assert defaults["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    assert f'".[{",".join(IMAGE_EXTRAS)}]"' in runs[extra_at]
    # Only the constraints and the package sources go into the image.
    copies = [c.value for c in build if c.cmd == "COPY"]
    assert copies == [("infra/docker/constraints.txt", "./"), ("pyproject.toml", "README.md", "./"),
                      ("producer", "./producer"), ("workers", "./workers")]


def test_runtime_stage_is_minimal_non_root_and_probed_over_http(commands):
    _, runtime = stages(commands)[-1]
    copies = [c for c in runtime if c.cmd == "COPY"]
    assert len(copies) == 1 and copies[0].flags == ("--from=build",)
    assert copies[0].value == ("/opt/fleet", "/opt/fleet")
    assert not any(c.cmd == "RUN" and "pip install" in c.value[0] for c in runtime)
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users and int(users[-1].split(":")[0]) >= 1000
    (health,) = [c for c in runtime if c.cmd == "HEALTHCHECK"]
    assert health.value[0] == "CMD" and "http://127.0.0.1:8080/readyz" in health.value[-1]
    entry = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    assert entry[-1].json and entry[-1].value == ("tini", "--", "fleet")
    cmd = [c for c in runtime if c.cmd == "CMD"][-1].value
    assert cmd[0] == "worker" and cmd[cmd.index("--device") + 1] == "auto"
    env = " ".join(" ".join(c.value) for c in runtime if c.cmd == "ENV")
    for needed in ("HF_HUB_OFFLINE 1", "FLEET_ARTIFACT_DIR /var/lib/fleet/artifacts", "FLEET_PROBE_PORT 8080"):
        assert needed in env
    apt = " ".join(c.value[0] for c in runtime if c.cmd == "RUN")
    assert "--no-install-recommends tini" in apt and "rm -rf /var/lib/apt/lists/*" in apt


def test_constraints_pin_every_requirement_the_image_installs():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in IMAGE_EXTRAS:
        wanted += project.get("optional-dependencies", {}).get(extra, [])
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue  # pinned by the TORCH_VERSION build argument
        assert name in pins, f"{requirement} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
