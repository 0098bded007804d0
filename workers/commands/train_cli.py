"""``fleet train KIND ... [--follow]``: submit a training job, optionally follow it live."""

from __future__ import annotations

import time
from typing import Any, cast

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from producer import FleetClient, FleetError, TrainResult
from workers.commands.exit_codes import ExitCode

#: ``fleet train`` option -> TrainRequest field.
FIELDS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "learning_rate", "grad_accum": "grad_accum_steps",
          "precision": "precision", "seed": "seed", "register_as": "register_as",
          "export_onnx": "export_onnx", "serve_on": "serve_on"}
POLL_S = 0.5


def run_train_command(kind: str, dataset: str | None, options: dict[str, Any], *, follow: bool) -> ExitCode:
    """Submit; with ``follow`` show a progress bar from the job's PROGRESS reports and the final metrics.

    ``options`` maps ``fleet train`` option names (``FIELDS``) to the values given. A refused
    request raises (the CLI reports it, exit ``REFUSED``); a job that fails returns ``FAILURE``.
    """
    console = Console()
    fields = {FIELDS[option]: value for option, value in options.items()}
    with FleetClient() as client:
        handle = client.train(kind, dataset, **fields)
        console.print(f"submitted training job {handle.id}")
        if not follow:
            return ExitCode.OK
        columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[detail]}"))
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("queued", total=None, detail="")
            last_epoch = 0
            while not handle.status().finished:
                progress = handle.progress()
                if progress is not None and progress.epoch != last_epoch:
                    # One plain line per epoch too, so logs and non-terminal output show progress.
                    bar.console.print(f"epoch {progress.epoch}/{progress.epochs} step {progress.step}/"
                                      f"{progress.total_steps} loss {progress.loss:.4f} "
                                      f"eta {progress.eta_s:.0f} s")
                    last_epoch = progress.epoch
                if progress is not None:
                    bar.update(task, total=progress.total_steps, completed=progress.step,
                               description=f"epoch {progress.epoch}/{progress.epochs}",
                               detail=f"loss {progress.loss:.4f}  lr {progress.learning_rate:.2e}  "
                                      f"{progress.samples_per_s:.0f} samples/s")
                time.sleep(POLL_S)
            try:
                result = cast(TrainResult, handle.result(timeout=10))
            except FleetError as exc:
                console.print(f"[red]training job failed:[/red] {exc}")
                return ExitCode.FAILURE
            bar.update(task, completed=result.steps, total=result.steps, description="done")
    table = Table(title=f"{result.kind.value} on {result.dataset} ({result.device})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(result.metrics.items()):
        table.add_row(name, f"{value:.4f}")
    table.add_row("optimizer steps", str(result.steps))
    table.add_row("artifact", result.artifact)
    if result.onnx_artifact:
        table.add_row("onnx export", result.onnx_artifact)
    for reply in result.serving or []:
        table.add_row(f"served by {reply.worker}", reply.status.value if reply.ok else f"{reply.status.value} "
                      f"({reply.code or reply.message})")
    console.print(table)
    return ExitCode.OK
