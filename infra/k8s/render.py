"""Render Fleet's kustomize overlays offline, and list the Redis lists a queue uses.

    python infra/k8s/render.py infra/k8s/overlays/gpu > fleet-gpu.yaml
    python infra/k8s/render.py --lists fleet.embed.minilm

Rendering uses the real kustomize (the Go library sigs.k8s.io/kustomize/api v0.21.3,
embedded in the PyPI package ``pykustomize``), so it needs no ``kubectl``/``kustomize``
binary and no network. pykustomize 0.1.4 declares Requires-Python >= 3.14 but is pure
cffi over a bundled shared library and works on 3.11; install it with
``pip install --ignore-requires-python pykustomize==0.1.4`` (docs/DEPLOY.md explains).

The tests (tests/deploy/test_deploy_k8s.py, tests/deploy/test_autoscaling_sim.py) import this file by
path; it depends only on PyYAML, kombu and (for rendering) pykustomize.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}

#: Fleet configures kombu's Redis transport with these steps (producer/celery_config.py).
FLEET_PRIORITY_STEPS = [0, 3, 6, 9]


class RenderUnavailable(RuntimeError):
    """pykustomize is not installed (or its native library cannot load)."""


def render_text(path: str | Path) -> str:
    """Run ``kustomize build`` on ``path`` and return the YAML stream."""
    try:
        import pykustomize
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise RenderUnavailable(
            "pykustomize is not installed: pip install --ignore-requires-python pykustomize==0.1.4"
        ) from exc
    return asyncio.run(pykustomize.build(str(path))).yaml


def render(path: str | Path) -> list[dict[str, Any]]:
    """Render ``path`` (a kustomization directory) into a list of resource dicts."""
    return [doc for doc in yaml.safe_load_all(render_text(path)) if doc]


def find(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """Resources of ``kind`` (and ``metadata.name`` == ``name`` if given)."""
    return [
        r for r in resources
        if r.get("kind") == kind and (name is None or r.get("metadata", {}).get("name") == name)
    ]


def one(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(resources, kind, name)
    if len(found) != 1:
        raise LookupError(f"expected one {kind}/{name}, found {len(found)}")
    return found[0]


def kombu_list_names(queue: str, priority_steps: list[int] = FLEET_PRIORITY_STEPS) -> list[str]:
    """The Redis list names kombu's Redis transport uses for ``queue``, one per priority step.

    Computed with kombu's own ``Channel._q_for_pri`` and ``Channel.sep`` (no connection is
    made), so the names follow kombu if it ever changes them.
    """
    from kombu.transport.redis import Channel

    fake = SimpleNamespace(sep=Channel.sep, priority_steps=list(priority_steps))
    fake.priority = lambda n: Channel.priority(fake, n)
    return [Channel._q_for_pri(fake, queue, step) for step in priority_steps]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="kustomization directory (e.g. infra/k8s/overlays/gpu)")
    parser.add_argument("--lists", metavar="QUEUE", help="print the Redis list names of QUEUE (repr)")
    args = parser.parse_args(argv)
    if args.lists:
        for name in kombu_list_names(args.lists):
            print(repr(name))
        return 0
    if not args.path:
        parser.error("give a kustomization directory or --lists QUEUE")
    sys.stdout.write(render_text(args.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
