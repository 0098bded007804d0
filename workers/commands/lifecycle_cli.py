"""``fleet models load|unload|switch``: change what running workers serve, and show each worker's reply.

The commands are ``FleetClient.models``'s (producer/model_control.py); this prints one row per
worker group and picks the exit code: ``OK`` when every worker did as asked (or already was so:
a load of a model it serves, an unload of one it does not), ``REFUSED`` when a worker refused
(``insufficient_memory``, ``unknown_model``, ...), ``FAILURE`` when one did not reply in time.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from producer import FleetClient, ModelCommandReply
from producer.contract.lifecycle import ReplyStatus
from workers.commands.exit_codes import ExitCode


def run_model_command(op: str, model: str, *, to: str | None = None, workers: str | None = None,
                      drain_grace_s: float | None = None, timeout: float) -> ExitCode:
    """Send ``op`` (``load``, ``unload``, ``switch``) for ``model`` and print the replies."""
    with FleetClient() as client:
        if op == "load":
            replies = client.models.load(model, workers=workers, timeout=timeout)
        elif op == "unload":
            replies = client.models.unload(model, workers=workers, drain_grace_s=drain_grace_s, timeout=timeout)
        else:
            assert to is not None, "switch needs --to"
            replies = client.models.switch(model, to, workers=workers, drain_grace_s=drain_grace_s, timeout=timeout)
    Console().print(reply_table(replies))
    return exit_code(replies)


def exit_code(replies: Sequence[ModelCommandReply]) -> ExitCode:
    if any(reply.status is ReplyStatus.REFUSED and not reply.settled for reply in replies):
        return ExitCode.REFUSED
    if any(reply.status is ReplyStatus.NO_REPLY for reply in replies):
        return ExitCode.FAILURE
    return ExitCode.OK


def reply_table(replies: Sequence[ModelCommandReply]) -> Table:
    table = Table(title="Model command replies")
    for column in ("worker", "model", "status", "device", "memory", "seconds", "current", "reason"):
        table.add_column(column, justify="right" if column in ("memory", "seconds") else "left")
    for reply in replies:
        style = "green" if reply.settled else ("yellow" if reply.status is ReplyStatus.NO_REPLY else "red")
        reason = f"{reply.code}: {reply.message}" if reply.code else reply.message
        table.add_row(reply.worker, reply.model, f"[{style}]{reply.status.value}[/]", reply.device or "-",
                      f"{reply.memory_bytes / 2**20:.0f} MiB" if reply.memory_bytes is not None else "-",
                      f"{reply.seconds:.2f}" if reply.seconds is not None else "-", reply.current or "-", reason)
    return table
