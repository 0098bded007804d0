"""The ``fleet`` command line, on click (as Celery's own CLI is).

Each subcommand is a small function here that imports what it runs only when it runs, so that
``fleet health`` never loads torch or Celery. Every option can also come from an environment
variable: ``FLEET_<COMMAND>_<OPTION>`` (``FLEET_WORKER_DEVICE``, ``FLEET_DLQ_...``), except where
a setting already has a name (``--registry``: ``FLEET_MODEL_REGISTRY``); ``--help`` shows each
one. A command returns an ``ExitCode`` (``workers/commands/exit_codes.py``); the errors a user
can fix end it with one line on stderr and their code (``workers/commands/failures.py``).

Adding a subcommand: decorate a function with ``@<group>.command(...)`` and ``option(...)``, add
``@needs_redis`` if it talks to Redis (it then fails in under 3 s when Redis is down), call
``require_extra`` for optional packages, and return an ``ExitCode``; ``models_export`` below is a
complete example. Put the logic in its own module; keep the command here to options, checks and one call.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from click_didyoumean import DYMGroup

from producer.version import DISTRIBUTION, __version__
from workers.commands.exit_codes import ExitCode

Command = TypeVar("Command", bound=Callable[..., Any])

#: ``click.option`` that shows its environment variable in ``--help``.
option = functools.partial(click.option, show_envvar=True)


#: ``ctx.meta`` key (shared by every context of one run): the path of the command that runs.
COMMAND_PATH = "fleet.command_path"


class FleetCommand(click.Command):
    """A subcommand that records its path (``fleet dlq list``) for the error line."""

    def invoke(self, ctx: click.Context) -> Any:
        ctx.meta[COMMAND_PATH] = ctx.command_path
        return super().invoke(ctx)


class FleetSubgroup(DYMGroup):
    """A group of subcommands (``fleet dlq``, ``fleet models``): did-you-mean, ``FleetCommand`` members."""

    command_class = FleetCommand


class FleetGroup(FleetSubgroup):
    """The root group: did-you-mean for mistyped commands, and one line instead of a traceback.

    Errors a user can fix become a ``CommandFailure`` (``failures.failure_for``); output to a
    reader that went away (``fleet dlq list | head``) ends quietly with ``OUTPUT_CLOSED``.
    """

    group_class = FleetSubgroup

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            finally:
                sys.stdout.flush()  # a closed pipe shows here, not as noise at interpreter exit
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            # Python's documented recipe: point stdout at /dev/null so the final flush is silent too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(ExitCode.OUTPUT_CLOSED) from None
        except KeyboardInterrupt:
            from workers.commands.failures import CommandFailure

            raise CommandFailure(ExitCode.INTERRUPTED, "interrupted", ctx.meta.get(COMMAND_PATH, "fleet")) from None
        except Exception as exc:
            from workers.commands.failures import failure_for

            failure = failure_for(exc, ctx.meta.get(COMMAND_PATH, "fleet"))
            if failure is None:
                raise
            raise failure from exc


def needs_redis(command: Command) -> Command:
    """Run ``command`` only if Redis answers (``preflight.require_redis``), else fail at once."""

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        from workers.commands.preflight import require_redis

        require_redis()
        return command(*args, **kwargs)

    return checked  # type: ignore[return-value]


def require_extra(module: str, *, extra: str, purpose: str = "this command") -> None:
    """Refuse (exit ``CONFIG``, naming the extra to install) if an optional dependency is missing.

    Only looks for it: the command's own code imports it where it is used (a worker's launcher
    never imports torch; its device process does)."""
    from producer.optional import require_installed

    require_installed(module, extra=extra, purpose=purpose)


@click.group(cls=FleetGroup, context_settings={"auto_envvar_prefix": "FLEET", "help_option_names": ["-h", "--help"],
                                               "show_default": True, "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", message=f"%(prog)s %(version)s ({DISTRIBUTION})")
def cli() -> None:
    """Fleet: machine-learning jobs on Redis queues, served by one worker per device.

    \b
    Every command reads REDIS_URL (default redis://127.0.0.1:6379/0; rediss:// for TLS,
    sentinel://host:26379;... with FLEET_SENTINEL_MASTER). Each option can also be set by the
    environment variable shown in its --help. Exit codes: README.md, "Exit codes".
    """


@cli.result_callback()
def exit_with(code: ExitCode | int | None, **_: Any) -> None:
    """End the process with the code the command returned (None: OK)."""
    click.get_current_context().exit(int(code or ExitCode.OK))


def _names(models: str) -> list[str]:
    return [name.strip() for name in models.split(",") if name.strip()]


@cli.command()
@option("--device", default="auto", help="auto | cpu | mps | cuda:N")
@option("--models", default="", show_default=False, help="comma-separated model names from the registry")
@option("--registry", envvar="FLEET_MODEL_REGISTRY", default=None, show_default="the registry packaged with Fleet",
        help="model registry TOML")
@option("--name", default=None, show_default="fleet-<device>@<host>", help="Celery node name")
@option("--train", is_flag=True, help="also take training jobs (the fleet.training queue)")
@option("--consumers", type=click.IntRange(1, 64), default=None,
        show_default="1 on CPU; on a GPU, from the CPU cores per GPU",
        help="consumer processes (Celery, no torch) feeding the one device process")
@option("--serve-trained", is_flag=True,
        help="load the models training jobs register with serve_on this device, as soon as they finish")
@option("--reset-models", is_flag=True,
        help="serve exactly --models, not what this worker served before it was restarted")
@needs_redis
def worker(device: str, models: str, registry: str | None, name: str | None, train: bool,
           consumers: int | None, serve_trained: bool, reset_models: bool) -> int:
    """Run one worker process pinned to one device: load the models, then consume their queues.

    \b
    A worker is a group of processes: one device process that owns the device and the models, and
    --consumers Celery consumer processes that receive, validate and tokenise jobs and answer them.
    On SIGTERM it stops taking jobs, lets running ones finish within FLEET_DRAIN_GRACE_S and
    hands the rest back. `fleet models load|unload|switch` change its models while it runs; started
    again under the same --name (and --models), it serves what it served before. Reads REDIS_URL
    and the worker settings: FLEET_CONCURRENCY, FLEET_TORCH_THREADS, FLEET_DRAIN_GRACE_S,
    FLEET_MAX_ATTEMPTS, FLEET_VISIBILITY_TIMEOUT_S, FLEET_RESULT_EXPIRES_S, FLEET_SWEEP_INTERVAL_S,
    FLEET_SWEEP_GRACE_S, FLEET_ARTIFACT_DIR, FLEET_LOG_LEVEL, CUDA_VISIBLE_DEVICES and the OTEL_*
    telemetry variables. Needs the worker extra (and training for --train on the digits data set,
    otel for telemetry export).
    """
    require_extra("torch", extra="worker")
    from pathlib import Path

    from workers.process.worker_main import WorkerOptions, run_worker
    from workers.settings import WorkerSettings

    settings = WorkerSettings(model_registry=Path(registry)) if registry else WorkerSettings()
    return run_worker(WorkerOptions(device=device, models=_names(models), name=name, train=train,
                                    consumers=consumers, serve_trained=serve_trained, reset_models=reset_models),
                      settings)


@cli.command()
@option("--devices", default="all", help="all | 0,1 (GPU ids) | cpu | cpu:N")
@option("--models", default="", show_default=False, help="comma-separated model names every worker serves")
@option("--registry", envvar="FLEET_MODEL_REGISTRY", default=None, show_default="the registry packaged with Fleet",
        help="model registry TOML")
@option("--train", is_flag=True, help="workers also take training jobs")
@option("--serve-trained", is_flag=True,
        help="workers load the models training jobs register with serve_on their device, when they finish")
@option("--flower", is_flag=True, help="also run the Flower dashboard on 127.0.0.1 (the dashboard extra)")
@option("--flower-port", type=click.IntRange(1, 65535), default=5555, help="Flower's port")
@option("--consumers", type=click.IntRange(1, 64), default=None,
        show_default="1 on CPU; on a GPU, from the CPU cores per GPU", help="consumer processes per worker")
@needs_redis
def up(devices: str, models: str, registry: str | None, train: bool, serve_trained: bool, flower: bool,
       flower_port: int, consumers: int | None) -> int:
    """Run and supervise one `fleet worker` per device, restarted with back-off if one dies.

    \b
    SIGINT or SIGTERM stops them all, each draining. Reads REDIS_URL, FLEET_DRAIN_GRACE_S,
    FLEET_LOG_LEVEL, CUDA_VISIBLE_DEVICES (the GPUs `all` means) and, with --flower,
    FLOWER_BASIC_AUTH and Flower's other FLOWER_* variables; workers read what
    `fleet worker` reads. Needs the worker extra (dashboard for --flower).
    """
    require_extra("torch", extra="worker")
    import socket

    from workers.observability.logs import configure_logging
    from workers.process.supervisor import PlanError, Supervised, Supervisor, plan_workers, visible_gpus
    from workers.settings import WorkerSettings

    settings = WorkerSettings()
    configure_logging(settings.log_level)
    try:
        plans = plan_workers(devices, visible_gpus(), settings.hostname or socket.gethostname())
    except PlanError as exc:
        raise click.BadParameter(str(exc), param_hint="--devices") from None
    from workers.process.worker_main import default_consumers

    consumers = consumers or default_consumers(plans[0].device, os.cpu_count() or 1, len(plans))
    children = [Supervised.worker(plan, models, registry, train, consumers, serve_trained) for plan in plans]
    if flower:
        require_extra("flower", extra="dashboard", purpose="--flower")
        from workers.commands import flower as dashboard

        auth_env, how_to_log_in = dashboard.flower_auth_env(dict(os.environ))
        children.append(Supervised(dashboard.NAME, dashboard.flower_command(flower_port), auth_env))
        click.echo(f"fleet up: Flower dashboard on http://{dashboard.ADDRESS}:{flower_port} ({how_to_log_in})",
                   err=True)
    return Supervisor(children, settings.drain_grace_s).run()


@cli.command()
def demo() -> int:
    """Run the whole path once on this machine: Redis, a CPU worker, embed, classify and train jobs.

    \b
    Uses the Redis at REDIS_URL if one answers, else starts an embedded redis-server. Needs the
    demo extra. Reads REDIS_URL and FLEET_LOG_LEVEL (the worker's, default WARNING).
    """
    require_extra("torch", extra="demo")
    require_extra("rich", extra="demo")
    from workers.commands.demo import run_demo

    return run_demo()


@cli.command()
@option("--worker", default=None, show_default="every worker on this host",
        help="check this worker (node name, with or without @host)")
@option("--live", is_flag=True, help="liveness: succeed while the worker heartbeats, even when draining "
                                     "(without it: readiness)")
@needs_redis
def health(worker: str | None, live: bool) -> int:
    """Probe: exit 0 iff a worker on this host is ready (with --live: alive), else 1.

    \b
    Prints one line, "ok: ..." or "failed: ...". Reads REDIS_URL and HOSTNAME.
    """
    from producer.redis_connection import redis_client
    from producer.settings import FleetSettings
    from workers.commands.preflight import PING_TIMEOUT_S
    from workers.process.health import probe

    client = redis_client(FleetSettings(), patient=False, socket_connect_timeout=PING_TIMEOUT_S,
                          socket_timeout=PING_TIMEOUT_S)
    ok, reason = probe(client, worker=worker, live=live)
    click.echo(("ok: " if ok else "failed: ") + reason)
    return ExitCode.OK if ok else ExitCode.FAILURE


@cli.command()
@needs_redis
def status() -> int:
    """Print the workers (device, models, jobs in flight) and every model's queue depth.

    \b
    Reads REDIS_URL. Needs the cli extra.
    """
    require_extra("rich", extra="cli")
    from workers.commands.status import print_status

    return print_status()


@cli.command()
@click.argument("kind", type=click.Choice(["mlp", "cnn", "causal_lm"]))
@option("--dataset", default=None, show_default="the kind's", help="digits (mlp, cnn) or corpus (causal_lm)")
@option("--epochs", type=click.IntRange(min=1), default=None)
@option("--batch-size", type=click.IntRange(min=1), default=None)
@option("--lr", type=float, default=None, help="peak learning rate")
@option("--grad-accum", type=click.IntRange(min=1), default=None, help="micro-batches per optimizer step")
@option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None)
@option("--seed", type=int, default=None)
@option("--register-as", default=None, help="serve the finished model under this name (NAME or NAME@VERSION)")
@option("--serve-on", type=click.Choice(["cpu", "cuda", "mps", "any"]), default=None,
        help="have running `fleet worker --serve-trained` workers on this device load it when it is registered")
@option("--export-onnx", is_flag=True, default=None,
        help="also export the finished mlp/cnn to ONNX (served with ONNX Runtime if registered)")
@option("--follow", is_flag=True, help="show live progress and the final metrics")
@needs_redis
def train(kind: str, dataset: str | None, follow: bool, **fields: Any) -> int:
    """Submit a training job (mlp, cnn, causal_lm); with --follow, watch it to the end.

    \b
    Unset options take the kind's defaults (docs/PROTOCOL.md). Reads REDIS_URL and
    FLEET_MAX_QUEUE_DEPTH. Needs the cli extra.
    """
    require_extra("rich", extra="cli")
    from workers.commands.train_cli import run_train_command

    return run_train_command(kind, dataset, {name: value for name, value in fields.items() if value is not None},
                             follow=follow)


@cli.group()
def models() -> None:
    """Make and manage models: load, unload and switch them on running workers."""


_workers_option = option("--workers", default=None, show_default="every live worker (load); those serving it",
                         help="worker name patterns, comma-separated (fleet-gpu*, fleet-cpu@host-a)")
_grace_option = option("--drain-grace", "drain_grace_s", type=click.FloatRange(min=0), default=None,
                       show_default="the worker's FLEET_DRAIN_GRACE_S",
                       help="seconds the retiring model's jobs in flight may take before they are handed back")
_timeout_option = option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0,
                         help="seconds to wait for every worker's reply")


@models.command("load")
@click.argument("name")
@_workers_option
@_timeout_option
@needs_redis
def models_load(name: str, workers: str | None, timeout: float) -> int:
    """Load NAME (or NAME@VERSION) on running workers beside what they serve, then serve it.

    \b
    Each worker checks its free device memory first (refused: insufficient_memory) and keeps serving
    its other models while this one loads. Prints each worker's reply; exit 0 when all loaded it (or
    had it), 65 when one refused, 1 when one did not reply in time. Reads REDIS_URL. Needs the cli extra.
    """
    require_extra("rich", extra="cli")
    from workers.commands.lifecycle_cli import run_model_command

    return run_model_command("load", name, workers=workers, timeout=timeout)


@models.command("unload")
@click.argument("name")
@_workers_option
@_grace_option
@_timeout_option
@needs_redis
def models_unload(name: str, workers: str | None, drain_grace_s: float | None, timeout: float) -> int:
    """Stop serving NAME (NAME@VERSION; a bare name: every version) on running workers and free its memory.

    \b
    Workers stop taking its jobs first, let those in flight finish (the rest go back to the queue after
    --drain-grace), then free it. Jobs for a model no live worker serves wait in Redis; clients refuse
    new ones unless told to wait (docs/PROTOCOL.md). Exit codes as for load. Reads REDIS_URL.
    """
    require_extra("rich", extra="cli")
    from workers.commands.lifecycle_cli import run_model_command

    return run_model_command("unload", name, workers=workers, drain_grace_s=drain_grace_s, timeout=timeout)


@models.command("switch")
@click.argument("name")
@option("--to", "version", required=True, help="the version to serve NAME as (NAME@VERSION in the registry)")
@_workers_option
@_grace_option
@_timeout_option
@needs_redis
def models_switch(name: str, version: str, workers: str | None, drain_grace_s: float | None, timeout: float) -> int:
    """Move the workers serving NAME to NAME@VERSION with no moment unserved.

    \b
    Each loads the new version, serves NAME's jobs with it, then drains and unloads the old one. Jobs
    pinned to a version (NAME@V) go to that version only. Exit codes as for load. Reads REDIS_URL.
    """
    require_extra("rich", extra="cli")
    from workers.commands.lifecycle_cli import run_model_command

    return run_model_command("switch", name, to=version, workers=workers, drain_grace_s=drain_grace_s,
                             timeout=timeout)


@models.command("init-demo")
@option("--dir", "directory", default="var/models", type=click.Path(file_okay=False),
        help="where to write the models and their registry")
def models_init_demo(directory: str) -> int:
    """Write a tiny Llama, a topic classifier on MiniLM and a registry serving them. Needs the worker extra."""
    require_extra("transformers", extra="worker")
    from pathlib import Path

    from workers.observability.logs import configure_logging
    from workers.serving.models.demo_models import init_demo

    configure_logging("INFO")
    registry = init_demo(Path(directory))
    click.echo(f"wrote demo models and {registry}\n"
               f"serve them with: fleet up --devices cpu:2 --registry {registry} --models minilm,topics,tiny-llama")
    return ExitCode.OK


@models.command("export")
@click.argument("name")
@option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", help="the export format")
@option("--out", required=True, type=click.Path(file_okay=False), help="the export directory to write (or replace)")
@option("--quantize", type=click.Choice(["int8"]), default=None, show_default="none",
        help="int8: dynamic int8 quantization, refused below its agreement bar")
@option("--registry", envvar="FLEET_MODEL_REGISTRY", default=None, show_default="the registry packaged with Fleet",
        help="model registry TOML")
def models_export(name: str, fmt: str, out: str, quantize: str | None, registry: str | None) -> int:
    """Export NAME (a registry model or one a training job registered) to ONNX, checked against PyTorch.

    \b
    Writes the graph, its tokenizer files and a manifest; refuses (exit 1, nothing written) a graph
    whose outputs differ from PyTorch's. Reads REDIS_URL (trained models; skipped if Redis does not
    answer) and FLEET_MODEL_REGISTRY. Needs the worker and onnx extras.
    """
    require_extra("torch", extra="worker")
    require_extra("onnxruntime", extra="onnx")
    from workers.commands.export_cli import run_export

    return run_export(name, out, quantize=quantize, registry_path=registry)


@cli.group()
def dlq() -> None:
    """Inspect, retry and purge dead-lettered jobs (the fleet:dlq hash). Each reads REDIS_URL."""


@dlq.command("list")
@needs_redis
def dlq_list() -> int:
    """One line per dead-lettered job, oldest first: id, task, attempts, reason."""
    from workers.commands.dead_letters import list_dead_letters

    return list_dead_letters()


@dlq.command("show")
@click.argument("job_id")
@needs_redis
def dlq_show(job_id: str) -> int:
    """Print one entry as JSON (exit 1 if there is none)."""
    from workers.commands.dead_letters import show_dead_letter

    return show_dead_letter(job_id)


@dlq.command("retry")
@click.argument("job_id")
@needs_redis
def dlq_retry(job_id: str) -> int:
    """Send the job again under its own id (exit 1 if there is no entry)."""
    from workers.commands.dead_letters import retry_dead_letter

    return retry_dead_letter(job_id)


@dlq.command("purge")
@needs_redis
def dlq_purge() -> int:
    """Delete every entry."""
    from workers.commands.dead_letters import purge_dead_letters

    return purge_dead_letters()


def main(argv: list[str] | None = None) -> int:
    """Run ``fleet ARGV`` (default: ``sys.argv[1:]``); return the exit code."""
    try:
        cli.main(args=argv, prog_name="fleet")
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or ExitCode.OK
        click.echo(done.code, err=True)  # sys.exit("message"), as the interpreter would print it
        return ExitCode.FAILURE
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
