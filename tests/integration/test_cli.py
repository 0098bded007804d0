"""The ``fleet`` command line as a user meets it: the real console script against a real Redis,
against a port where nothing listens, against a Redis that never answers, and into a closed pipe."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import click
import pytest

from producer.version import DISTRIBUTION, __version__
from tests.support.fleet_processes import fleet_executable, run_fleet
from workers.commands.cli import cli
from workers.commands.exit_codes import ExitCode
from workers.process.embedded_redis import RedisServer, free_port
from workers.queue import dlq

PASSWORD = "pw-Secret-9"

#: Every command that works with Redis: its path, then the arguments it needs to get that far.
REDIS_COMMANDS = [
    ("status", []), ("health", []), ("health", ["--live"]), ("dlq list", []), ("dlq show", ["some-id"]),
    ("dlq retry", ["some-id"]), ("dlq purge", []), ("train", ["mlp", "--epochs", "1"]),
    ("worker", ["--device", "cpu", "--models", "minilm"]), ("up", ["--devices", "cpu"]),
    ("models load", ["minilm"]), ("models unload", ["minilm"]), ("models switch", ["digits", "--to", "2"]),
]


@pytest.fixture(scope="module")
def private_redis():
    server = RedisServer().start()
    yield server
    server.stop()


def _assert_one_line_about_redis(done: subprocess.CompletedProcess, url_shown: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert url_shown in lines[0] and PASSWORD not in done.stdout + done.stderr
    assert "REDIS_URL" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("path, arguments", REDIS_COMMANDS, ids=[" ".join([p, *a]) for p, a in REDIS_COMMANDS])
def test_with_nothing_listening_every_command_ends_with_one_line_naming_the_url(path, arguments):
    port = free_port()
    done = run_fleet([*path.split(), *arguments], f"redis://fleet:{PASSWORD}@127.0.0.1:{port}/0")
    assert done.returncode == ExitCode.REDIS_UNAVAILABLE, done.stdout + done.stderr
    _assert_one_line_about_redis(done, f"redis://fleet:**@127.0.0.1:{port}/0")
    assert done.stderr.startswith(f"fleet {path}: cannot reach Redis at ")


def test_a_redis_that_never_answers_is_reported_as_unreachable():
    """A host that accepts the connection and then stays silent (a hung server, a black hole)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the kernel backlog; nobody ever reads or answers
        port = silent.getsockname()[1]
        done = run_fleet(["dlq", "list"], f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    assert done.returncode == ExitCode.REDIS_UNAVAILABLE, done.stdout + done.stderr
    _assert_one_line_about_redis(done, f"redis://:**@127.0.0.1:{port}/0")


def test_output_to_a_closed_pipe_ends_quietly(private_redis):
    import redis

    client = redis.Redis.from_url(private_redis.url)
    for index in range(3000):  # far more than a pipe buffer holds
        dlq.dead_letter(client, f"job-{index:05d}", task="fleet.embed", queue="fleet.embed.minilm", payload={},
                        reason="worker_lost", attempts=3)
    try:
        reader = subprocess.Popen([*fleet_executable(), "dlq", "list"],
                                  env={**os.environ, "REDIS_URL": private_redis.url},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = reader.stdout.readline()
        reader.stdout.close()  # what `| head -1` does after its line
        reader.wait(120)
        errors = reader.stderr.read().decode()
        reader.stderr.close()
    finally:
        client.delete("fleet:dlq")
    assert first.startswith(b"job-00000")
    assert errors == "" and reader.returncode == ExitCode.OUTPUT_CLOSED


def test_version():
    done = run_fleet(["--version"], "redis://127.0.0.1:1/0")
    assert done.returncode == 0 and done.stdout.strip() == f"fleet {__version__} ({DISTRIBUTION})"


def test_a_mistyped_command_gets_a_suggestion_and_the_usage_code():
    done = run_fleet(["stauts"], "redis://127.0.0.1:1/0")
    assert done.returncode == ExitCode.USAGE and "status" in done.stderr


def test_options_come_from_their_fleet_variables(private_redis):
    done = run_fleet(["health"], private_redis.url, FLEET_HEALTH_WORKER="nobody-here")
    assert done.returncode == ExitCode.FAILURE and done.stdout.strip() == "failed: no heartbeat from worker nobody-here"
    done = run_fleet(["worker"], private_redis.url, FLEET_WORKER_DEVICE="tpu:0", FLEET_WORKER_MODELS="minilm")
    assert done.returncode == ExitCode.CONFIG and "tpu:0" in done.stdout + done.stderr


def _leaf_commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, (*path, name))
        else:
            yield (*path, name), command


def _value_from_environment(option: click.Option) -> tuple[str, object]:
    """A text for the option's variable and the value click must parse it to."""
    if option.is_flag:
        return "1", True
    if isinstance(option.type, click.Choice):
        return option.type.choices[0], option.type.choices[0]
    if isinstance(option.type, (click.types.IntParamType, click.IntRange)):
        return "7", 7
    if isinstance(option.type, click.types.FloatParamType):
        return "0.5", 0.5
    return "from-the-environment", "from-the-environment"


@pytest.mark.parametrize("path, command", list(_leaf_commands(cli)),
                         ids=lambda p: " ".join(p) if isinstance(p, tuple) else "")
def test_every_option_reads_a_fleet_variable_that_help_names(path, command, monkeypatch):
    """Parse each command with its options given only by the environment (nothing runs)."""
    parent = cli.make_context("fleet", list(path), resilient_parsing=True)
    group: click.Group = cli
    for name in path[:-1]:  # the contexts of the groups on the way (fleet dlq ...)
        group = group.commands[name]
        parent = group.make_context(name, list(path[path.index(name) + 1:]), parent=parent, resilient_parsing=True)
    expected = {}
    for option in (param for param in command.params if isinstance(param, click.Option)):
        if option.name == "help":
            continue
        command_prefix = f"{parent.auto_envvar_prefix}_{path[-1].replace('-', '_').upper()}"
        variable = option.envvar or f"{command_prefix}_{option.name.upper()}"
        assert variable.startswith("FLEET_"), variable
        text, expected[option.name] = _value_from_environment(option)
        monkeypatch.setenv(variable, text)
        assert variable in command.get_help(click.Context(command, info_name=path[-1], parent=parent)), (
            f"fleet {' '.join(path)} --help does not name {variable}")
    arguments = [param.type.choices[0] if isinstance(param.type, click.Choice) else "an-id"
                 for param in command.params if isinstance(param, click.Argument)]
    parsed = command.make_context(path[-1], arguments, parent=parent)
    assert {name: parsed.params[name] for name in expected} == expected
    assert (command.help or "").strip(), f"fleet {' '.join(path)} has no help"


def test_a_missing_extra_is_named_with_the_command_to_install_it(private_redis):
    code = ("import sys; sys.modules['rich'] = None\n"  # what an install without the cli extra looks like
            "from workers.commands.cli import main; sys.exit(main(['status']))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "REDIS_URL": private_redis.url},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert done.stderr.strip() == (f"fleet status: this command needs the Python package 'rich', which is not "
                                   f"installed: pip install '{DISTRIBUTION}[cli]'")


def test_a_refused_request_has_its_own_code(private_redis):
    done = run_fleet(["train", "causal_lm", "--dataset", "digits"], private_redis.url)
    assert done.returncode == ExitCode.REFUSED, done.stdout + done.stderr
    assert done.stderr.startswith("fleet train: refused, nothing was enqueued:") and "Traceback" not in done.stderr
