"""The ``fleet`` command. Each subcommand imports only what it needs (``fleet health`` never loads torch)."""

from __future__ import annotations

import argparse
import sys


def _cmd_worker(args: argparse.Namespace) -> int:
    from workers.process.worker_main import WorkerOptions, run_worker
    from workers.settings import WorkerSettings

    overrides = {"model_registry": args.registry} if args.registry else {}
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else []
    options = WorkerOptions(device=args.device, models=models, name=args.name, train=args.train,
                            consumers=args.consumers)
    return run_worker(options, WorkerSettings(**overrides))


def _cmd_demo(args: argparse.Namespace) -> int:
    from workers.commands.demo import run_demo

    return run_demo()


def _cmd_health(args: argparse.Namespace) -> int:
    import redis

    from producer.redis_connection import RedisURLError, redis_client
    from producer.settings import FleetSettings
    from workers.process.health import probe

    try:
        client = redis_client(FleetSettings(), patient=False, socket_connect_timeout=2, socket_timeout=2)
        ok, reason = probe(client, worker=args.worker, live=args.live)
    except RedisURLError as exc:
        ok, reason = False, f"bad REDIS_URL: {exc}"
    except redis.RedisError as exc:
        ok, reason = False, f"Redis unreachable: {exc}"
    print(("ok: " if ok else "failed: ") + reason)
    return 0 if ok else 1


def _cmd_up(args: argparse.Namespace) -> int:
    import os
    import socket

    from workers.observability.logs import configure_logging
    from workers.settings import WorkerSettings
    from workers.process.supervisor import PlanError, Supervised, Supervisor, plan_workers, visible_gpus

    settings = WorkerSettings()
    configure_logging(settings.log_level)
    try:
        plans = plan_workers(args.devices, visible_gpus(), settings.hostname or socket.gethostname())
    except PlanError as exc:
        print(f"fleet up: {exc}", file=sys.stderr)
        return 2
    from workers.process.worker_main import default_consumers

    consumers = args.consumers or default_consumers(plans[0].device, os.cpu_count() or 1, len(plans))
    children = [Supervised.worker(plan, args.models, args.registry, args.train, consumers) for plan in plans]
    if args.flower:
        from workers.commands import flower

        auth_env, how_to_log_in = flower.flower_auth_env(dict(os.environ))
        children.append(Supervised(flower.NAME, flower.flower_command(args.flower_port), auth_env))
        print(f"fleet up: Flower dashboard on http://{flower.ADDRESS}:{args.flower_port} ({how_to_log_in})",
              file=sys.stderr)
    return Supervisor(children, settings.drain_grace_s).run()


def _cmd_models_init_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workers.observability.logs import configure_logging
    from workers.serving.models.demo_models import init_demo

    configure_logging("INFO")
    registry = init_demo(Path(args.dir))
    print(f"wrote demo models and {registry}\n"
          f"serve them with: fleet up --devices cpu:2 --registry {registry} --models minilm,topics,tiny-llama")
    return 0


def _cmd_models_export(args: argparse.Namespace) -> int:
    from workers.commands.export_cli import run_export

    return run_export(args.name, args.out, fmt=args.format, quantize=args.quantize, registry_path=args.registry)


def _cmd_dlq(args: argparse.Namespace) -> int:
    import json

    from producer.redis_connection import redis_client
    from producer.settings import FleetSettings
    from workers.queue import dlq

    client = redis_client(FleetSettings())
    if args.dlq_command == "list":
        for entry in dlq.list_entries(client):
            print(f"{entry['job_id']}  {entry['task']:<15} attempts={entry['attempts']}  {entry['reason']}")
        return 0
    if args.dlq_command == "purge":
        print(f"purged {dlq.purge(client)} entries")
        return 0
    entry = dlq.get_entry(client, args.job_id)
    if entry is None:
        print(f"no dead-letter entry for job {args.job_id}", file=sys.stderr)
        return 1
    if args.dlq_command == "show":
        print(json.dumps(entry, indent=2))
        return 0
    from workers.queue.app import app

    try:
        dlq.retry(client, app, args.job_id)
    except dlq.NotRetriable as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"re-sent job {args.job_id} to {entry['queue']}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from workers.commands.train_cli import run_train_command

    return run_train_command(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from workers.commands.status import print_status

    return print_status()


def build_parser() -> argparse.ArgumentParser:
    from workers.commands import flower as flower_defaults  # constants only: imports neither Celery nor Flower

    parser = argparse.ArgumentParser(prog="fleet", description="Fleet: ML jobs on a Redis queue.")
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run one worker process pinned to one device")
    worker.add_argument("--device", default="auto", help="auto | cpu | mps | cuda:N (default auto)")
    worker.add_argument("--models", default="", help="comma-separated model names from the registry")
    worker.add_argument("--registry", default=None, help="model registry TOML (default $FLEET_MODEL_REGISTRY)")
    worker.add_argument("--name", default=None, help="worker node name (default fleet-<device>@<host>)")
    worker.add_argument("--train", action="store_true", help="also take training jobs")
    worker.add_argument("--consumers", type=int, default=None,
                        help="consumer processes feeding the device process (default: 1 on CPU, from the cores per GPU)")
    worker.set_defaults(func=_cmd_worker)

    demo = commands.add_parser("demo", help="run the whole path once on this machine")
    demo.set_defaults(func=_cmd_demo)

    health = commands.add_parser("health", help="exit 0 iff the worker on this host is ready")
    health.add_argument("--worker", default=None, help="check this worker name instead of this host's")
    health.add_argument("--live", action="store_true",
                        help="liveness: succeed while the worker heartbeats, even when draining (default: readiness)")
    health.set_defaults(func=_cmd_health)

    up = commands.add_parser("up", help="run and supervise one worker process per device")
    up.add_argument("--devices", default="all", help="all | 0,1 (GPU ids) | cpu | cpu:N (default all)")
    up.add_argument("--models", default="", help="comma-separated model names every worker serves")
    up.add_argument("--registry", default=None, help="model registry TOML (default $FLEET_MODEL_REGISTRY)")
    up.add_argument("--train", action="store_true", help="workers also take training jobs")
    up.add_argument("--consumers", type=int, default=None,
                    help="consumer processes per worker (default: 1 on CPU, from the cores per GPU)")
    up.add_argument("--flower", action="store_true", help="also run the Flower dashboard (on 127.0.0.1)")
    up.add_argument("--flower-port", type=int, default=flower_defaults.DEFAULT_PORT,
                    help=f"Flower's port (default {flower_defaults.DEFAULT_PORT})")
    up.set_defaults(func=_cmd_up)

    models = commands.add_parser("models", help="manage models")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    init_demo = model_commands.add_parser("init-demo", help="write a tiny Llama, a topic classifier and a registry")
    init_demo.add_argument("--dir", default="var/models", help="where to write them (default var/models)")
    init_demo.set_defaults(func=_cmd_models_init_demo)
    export = model_commands.add_parser("export", help="export a model to ONNX, checked against PyTorch")
    export.add_argument("name", help="a model of the registry, or one a training job registered")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="onnx (the only format)")
    export.add_argument("--out", required=True, help="the export directory to write (or replace)")
    export.add_argument("--quantize", choices=["int8"], default=None, help="int8: dynamic int8 quantization")
    export.add_argument("--registry", default=None, help="model registry TOML (default $FLEET_MODEL_REGISTRY)")
    export.set_defaults(func=_cmd_models_export)

    dead = commands.add_parser("dlq", help="inspect and retry dead-lettered jobs")
    dead_commands = dead.add_subparsers(dest="dlq_command", required=True)
    dead_commands.add_parser("list", help="one line per dead job").set_defaults(func=_cmd_dlq)
    dead_commands.add_parser("purge", help="delete every entry").set_defaults(func=_cmd_dlq)
    for name, text in (("show", "print one entry as JSON"), ("retry", "send the job again under its id")):
        command = dead_commands.add_parser(name, help=text)
        command.add_argument("job_id")
        command.set_defaults(func=_cmd_dlq)

    train = commands.add_parser("train", help="submit a training job (mlp, cnn, causal_lm)")
    train.add_argument("kind", choices=["mlp", "cnn", "causal_lm"])
    train.add_argument("--dataset", default=None, help="digits (mlp, cnn) or corpus (causal_lm)")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None, help="peak learning rate")
    train.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    train.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--register-as", default=None, help="serve the finished model under this name")
    train.add_argument("--export-onnx", action="store_true", default=None,
                       help="also export the finished mlp/cnn to ONNX (served with ONNX Runtime if registered)")
    train.add_argument("--follow", action="store_true", help="show live progress and the final metrics")
    train.set_defaults(func=_cmd_train)

    status = commands.add_parser("status", help="print workers, devices, models and queue depths")
    status.set_defaults(func=_cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
