"""The ``fleet`` command. Each subcommand imports only what it needs (``fleet health`` never loads torch)."""

from __future__ import annotations

import argparse
import sys


def _cmd_worker(args: argparse.Namespace) -> int:
    from workers.worker_main import WorkerOptions, run_worker
    from workers.settings import WorkerSettings

    overrides = {"model_registry": args.registry} if args.registry else {}
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else []
    options = WorkerOptions(device=args.device, models=models, name=args.name, train=args.train)
    return run_worker(options, WorkerSettings(**overrides))


def _cmd_demo(args: argparse.Namespace) -> int:
    from workers.demo import run_demo

    return run_demo()


def _cmd_health(args: argparse.Namespace) -> int:
    import redis

    from producer.settings import FleetSettings
    from workers.health import probe

    client = redis.Redis.from_url(FleetSettings().redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        ok, reason = probe(client, worker=args.worker)
    except redis.RedisError as exc:
        ok, reason = False, f"Redis unreachable: {exc}"
    print(("ready: " if ok else "not ready: ") + reason)
    return 0 if ok else 1


def _cmd_status(args: argparse.Namespace) -> int:
    from workers.status import print_status

    return print_status()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet", description="Fleet: ML jobs on a Redis queue.")
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run one worker process pinned to one device")
    worker.add_argument("--device", default="auto", help="auto | cpu | mps | cuda:N (default auto)")
    worker.add_argument("--models", default="", help="comma-separated model names from the registry")
    worker.add_argument("--registry", default=None, help="model registry TOML (default $FLEET_MODEL_REGISTRY)")
    worker.add_argument("--name", default=None, help="worker node name (default fleet-<device>@<host>)")
    worker.add_argument("--train", action="store_true", help="also take training jobs")
    worker.set_defaults(func=_cmd_worker)

    demo = commands.add_parser("demo", help="run the whole path once on this machine")
    demo.set_defaults(func=_cmd_demo)

    health = commands.add_parser("health", help="exit 0 iff the worker on this host is ready")
    health.add_argument("--worker", default=None, help="check this worker name instead of this host's")
    health.set_defaults(func=_cmd_health)

    status = commands.add_parser("status", help="print workers, devices, models and queue depths")
    status.set_defaults(func=_cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
