"""Where a lost job was lost: replaying Redis' append-only file (AOF) of a chaos run.

Redis logs every write to its AOF; a worker's BRPOP is logged as the RPOP it amounted to.
Replaying the list commands and kombu's ``HSET unacked`` records tells, for a job with no
result, whether its message was never enqueued, or was handed to a worker by a BRPOP and never
recorded as unacked (kombu records a delivery with a second command after it has read the BRPOP
reply: a worker SIGKILLed in between takes the message with it), or neither. Reads Redis 7's
``appendonlydir/`` (an RDB base of auxiliary fields only, then incremental files) and Redis
6.2's single ``appendonly.aof``.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from pathlib import Path

NEVER_ENQUEUED = "never_enqueued"
IN_DELIVERY = "popped_never_recorded"
OTHER = "other"
UNKNOWN = "unknown"
UNACKED_KEY = b"unacked"  # kombu's hash of delivered, unacknowledged messages (no global key prefix)
#: Commands that change lists in ways this replay does not follow: met on a replayed list (any
#: SWAPDB), the AOF cannot tell where jobs were lost.
_UNFOLLOWED = {b"LSET", b"LINSERT", b"RENAME", b"RENAMENX", b"MOVE", b"COPY", b"SORT", b"SWAPDB"}


class AofUnreadable(Exception):
    """The AOF cannot tell where jobs were lost (rewritten, missing, or not understood)."""


def _resp_line(data: bytes, pos: int, marker: bytes) -> tuple[int, int] | None:
    """The integer after ``marker`` on the RESP line at ``pos`` and where the next line starts;
    None when the line is cut short at the end of ``data``."""
    end = data.find(b"\r\n", pos)
    if end < 0:
        return None
    if data[pos:pos + 1] != marker:
        raise AofUnreadable(f"expected {marker!r} at byte {pos}, found {data[pos:pos + 20]!r}")
    return int(data[pos + 1:end]), end + 2


def iter_resp_commands(data: bytes):
    """Yield each command of an AOF body (RESP arrays of bulk strings) as a list of bytes.

    A command cut short at the end of ``data`` (Redis killed mid-write, or still writing) ends the
    iteration; ``#...`` annotation lines (``aof-timestamp-enabled``) are skipped.
    """
    pos = 0
    while pos < len(data):
        if data[pos:pos + 1] == b"#":
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                return
            pos = line_end + 2
            continue
        header = _resp_line(data, pos, b"*")
        if header is None:
            return
        count, pos = header
        command = []
        for _ in range(count):
            bulk = _resp_line(data, pos, b"$")
            if bulk is None or bulk[1] + bulk[0] + 2 > len(data):
                return
            length, pos = bulk
            command.append(data[pos:pos + length])
            pos += length + 2
        yield command


def _rdb_length(data: bytes, pos: int) -> tuple[int, bool, int]:
    """An RDB length at ``pos``: (value, whether it is a special string encoding, next position)."""
    first = data[pos]
    kind = first >> 6
    if kind == 0:
        return first & 0x3F, False, pos + 1
    if kind == 1:
        return ((first & 0x3F) << 8) | data[pos + 1], False, pos + 2
    if kind == 3:
        return first & 0x3F, True, pos + 1
    size = 4 if first == 0x80 else 8
    return int.from_bytes(data[pos + 1:pos + 1 + size], "big"), False, pos + 1 + size


def _skip_rdb_string(data: bytes, pos: int) -> int:
    """Position after the RDB string encoded at ``pos``."""
    value, special, pos = _rdb_length(data, pos)
    if not special:
        return pos + value
    if value in (0, 1, 2):  # 8, 16, 32 bit integer
        return pos + (1, 2, 4)[value]
    compressed, _, pos = _rdb_length(data, pos)  # LZF: compressed length, plain length, bytes
    _, _, pos = _rdb_length(data, pos)
    return pos + compressed


def split_rdb_preamble(data: bytes) -> tuple[bool, bytes]:
    """For data that may start with an RDB image: (whether that image holds any key, the AOF after it).

    Only an image of auxiliary fields alone (what Redis 7 writes as the first base of an empty
    server) is read through; one holding keys returns (True, b"").
    """
    if not data.startswith(b"REDIS"):
        return False, data
    pos = 9  # "REDIS" + 4-digit version
    while pos < len(data):
        opcode = data[pos]
        if opcode == 0xFA:  # auxiliary field: name, value
            pos = _skip_rdb_string(data, _skip_rdb_string(data, pos + 1))
        elif opcode == 0xFF:  # end of file, then an 8-byte checksum
            return False, data[pos + 9:]
        else:
            return True, b""
    raise AofUnreadable("RDB image cut short")


def aof_files(redis_dir: Path) -> list[Path]:
    """The files to replay, oldest first: Redis 7's ``appendonlydir/`` (base, then incr files in
    order of the manifest) or Redis 6.2's single ``appendonly.aof``.

    Raises ``AofUnreadable`` when an AOF rewrite happened (a base of sequence > 1, or history
    files: the commands before the rewrite are gone) or there is no AOF.
    """
    directory = redis_dir / "appendonlydir"
    manifests = sorted(directory.glob("*.manifest")) if directory.is_dir() else []
    if manifests:
        entries = []
        for line in manifests[0].read_text().splitlines():
            fields = line.split()
            entry = dict(zip(fields[0::2], fields[1::2]))
            if "file" in entry:
                entries.append(entry)
        bases = [entry for entry in entries if entry.get("type") == "b"]
        if any(entry.get("type") == "h" for entry in entries) or any(entry["seq"] != "1" for entry in bases):
            raise AofUnreadable("an AOF rewrite happened: the commands before it are gone")
        increments = sorted((entry for entry in entries if entry.get("type") == "i"), key=lambda e: int(e["seq"]))
        return [directory / entry["file"].strip('"') for entry in bases + increments]
    single = redis_dir / "appendonly.aof"
    if single.exists():
        return [single]
    raise AofUnreadable(f"no append-only file under {redis_dir}")


def aof_commands(redis_dir: Path):
    """Every command of the AOF under ``redis_dir``, oldest first (see ``aof_files``).

    Raises ``AofUnreadable`` for an RDB base that holds keys, and for a single-file AOF that
    starts with an RDB preamble (Redis 6.2 writes one only when it rewrites the file).
    """
    for path in aof_files(redis_dir):
        data = path.read_bytes()
        has_keys, body = split_rdb_preamble(data)
        if has_keys or (data.startswith(b"REDIS") and ".base." not in path.name):
            raise AofUnreadable(f"{path.name} starts with an RDB image holding keys, or left by a rewrite: "
                                "the commands before it are gone")
        yield from iter_resp_commands(body)


def message_job_id(raw: bytes) -> str | None:
    """The job id of a kombu message as Redis holds it: the ``id`` header of its JSON envelope, or
    of the envelope first in an ``unacked`` entry (``[envelope, exchange, routing key]``)."""
    try:
        envelope = json.loads(raw)
        if isinstance(envelope, list) and envelope:
            envelope = envelope[0]
        job_id = envelope["headers"]["id"]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return job_id if isinstance(job_id, str) else None


class ListReplay:
    """Replays an AOF's list commands and ``HSET unacked`` records, keeping each job's history:
    ``(command number, "push" | "pop" | "removed" | "recorded", key)`` in AOF order."""

    def __init__(self) -> None:
        self.db = b"0"
        self.lists: dict[tuple[bytes, bytes], deque[tuple[bytes, str | None]]] = {}
        self.history: dict[str, list[tuple[int, str, str]]] = {}
        self.number = 0
        self.handlers: dict[bytes, Callable[..., object]] = {
            b"LPUSH": self._lpush, b"RPUSH": self._rpush, b"LPUSHX": self._lpushx,
            b"RPUSHX": self._rpushx, b"LPOP": self._lpop, b"RPOP": self._rpop,
            b"LMOVE": self._lmove, b"RPOPLPUSH": self._rpoplpush, b"LREM": self._lrem,
            b"LTRIM": self._ltrim, b"DEL": self._delete, b"UNLINK": self._delete,
            b"FLUSHDB": self._flushdb, b"FLUSHALL": self._flushall, b"SELECT": self._select,
            b"HSET": self._hset, b"HMSET": self._hset, b"HSETNX": self._hset
        }

    def replay(self, commands) -> ListReplay:
        """Apply every command (numbered from 1 in AOF order); a MULTI block applies at its EXEC and
        not at all if the AOF ends before (Redis too drops it when loading). Returns self."""
        pending: list[tuple[int, list[bytes]]] | None = None
        for number, command in enumerate(commands, 1):
            name = command[0].upper()
            if name == b"MULTI":
                pending = []
            elif name == b"EXEC" and pending is not None:
                for queued in pending:
                    self._apply(*queued)
                pending = None
            elif pending is not None:
                pending.append((number, command))
            else:
                self._apply(number, command)
        return self

    def _apply(self, number: int, command: list[bytes]) -> None:
        self.number = number
        name = command[0].upper()
        key = command[1] if len(command) > 1 else b""
        if name in _UNFOLLOWED and (name == b"SWAPDB" or (self.db, key) in self.lists):
            raise AofUnreadable(f"command {number} ({name.decode()}) changes a list in a way not replayed")
        handler = self.handlers.get(name)
        if handler is not None:
            handler(*command[1:])

    def _note(self, job_id: str | None, what: str, key: bytes) -> None:
        if job_id is not None:
            self.history.setdefault(job_id, []).append((self.number, what, ascii(key)[2:-1]))

    def _push(self, key: bytes, values, left: bool) -> None:
        items = self.lists.setdefault((self.db, key), deque())
        for value in values:
            item = (value, message_job_id(value))
            if left:
                items.appendleft(item)
            else:
                items.append(item)
            self._note(item[1], "push", key)

    def _pop(self, key: bytes, count: int, left: bool) -> list[tuple[bytes, str | None]]:
        items = self.lists.get((self.db, key), deque())
        popped = [items.popleft() if left else items.pop() for _ in range(min(count, len(items)))]
        for _, job_id in popped:
            self._note(job_id, "pop", key)
        if not items:
            self.lists.pop((self.db, key), None)
        return popped

    def _remove_where(self, key: bytes, keep) -> None:
        items = self.lists.get((self.db, key), deque())
        kept: deque[tuple[bytes, str | None]] = deque()
        for position, item in enumerate(items):
            if keep(position, item):
                kept.append(item)
            else:
                self._note(item[1], "removed", key)
        if kept:
            self.lists[(self.db, key)] = kept
        else:
            self.lists.pop((self.db, key), None)

    def _lpush(self, key, *values):
        self._push(key, values, left=True)

    def _rpush(self, key, *values):
        self._push(key, values, left=False)

    def _lpushx(self, key, *values):
        if (self.db, key) in self.lists:
            self._push(key, values, left=True)

    def _rpushx(self, key, *values):
        if (self.db, key) in self.lists:
            self._push(key, values, left=False)

    def _lpop(self, key, count=b"1"):
        self._pop(key, int(count), left=True)

    def _rpop(self, key, count=b"1"):
        self._pop(key, int(count), left=False)

    def _lmove(self, source, destination, where_from, where_to):
        for value, _ in self._pop(source, 1, left=where_from.upper() == b"LEFT"):
            self._push(destination, [value], left=where_to.upper() == b"LEFT")

    def _rpoplpush(self, source, destination):
        self._lmove(source, destination, b"RIGHT", b"LEFT")

    def _lrem(self, key, count, value):
        """LREM: up to ``count`` (0: all) items equal to ``value``, from the head (count < 0: tail)."""
        count = int(count)
        items = list(self.lists.get((self.db, key), ()))
        positions = [i for i, (item, _) in enumerate(items) if item == value]
        if count < 0:
            positions = positions[::-1]
        doomed = set(positions[:abs(count)] if count else positions)
        self._remove_where(key, lambda position, item: position not in doomed)

    def _ltrim(self, key, start, stop):
        """LTRIM with Redis' index rules (negative from the end, ``stop`` inclusive)."""
        size = len(self.lists.get((self.db, key), ()))
        first = max(0, int(start) + size if int(start) < 0 else int(start))
        last = min(size - 1, int(stop) + size if int(stop) < 0 else int(stop))
        self._remove_where(key, lambda position, item: first <= position <= last)

    def _delete(self, *keys):
        for key in keys:
            self._remove_where(key, lambda position, item: False)

    def _flushdb(self, *options):
        for _db, key in [k for k in self.lists if k[0] == self.db]:
            self._delete(key)

    def _flushall(self, *options):
        current = self.db
        for db in {k[0] for k in self.lists}:
            self.db = db
            self._flushdb()
        self.db = current

    def _select(self, db):
        self.db = db

    def _hset(self, key, *fields_and_values):
        if key == UNACKED_KEY:
            for value in fields_and_values[1::2]:
                self._note(message_job_id(value), "recorded", key)


def classify_loss(history: list[tuple[int, str, str]]) -> str:
    """Where a lost job's message went, from its AOF history (see ``ListReplay``).

    ``never_enqueued``: never pushed onto a list. ``popped_never_recorded``: its last pop was
    followed by neither a record in ``unacked`` nor another push: Redis handed it to a worker that
    never recorded it. ``other``: anything else (still queued, recorded and never acked, ...).
    """
    if not any(what == "push" for _, what, _ in history):
        return NEVER_ENQUEUED
    pops = [position for position, (_, what, _) in enumerate(history) if what == "pop"]
    if pops and not any(what in ("push", "recorded") for _, what, _ in history[pops[-1] + 1:]):
        return IN_DELIVERY
    return OTHER


def describe_history(history: list[tuple[int, str, str]], limit: int = 8) -> str:
    """A short account of a job's AOF history: ``push@120 fleet.embed.minilm, pop@121 ...``."""
    shown = [f"{what}@{number} {key}" for number, what, key in history[-limit:]]
    return ("... " if len(history) > limit else "") + ", ".join(shown)


def where_lost(redis_dir: Path, job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """For each lost job id: (``classify_loss`` verdict, or ``unknown``; its history or the reason
    the AOF cannot tell), from the AOF under ``redis_dir``."""
    if not job_ids:
        return {}
    try:
        replay = ListReplay().replay(aof_commands(redis_dir))
    except (AofUnreadable, OSError, ValueError, IndexError) as exc:
        return {job_id: (UNKNOWN, str(exc)) for job_id in job_ids}
    return {job_id: (classify_loss(replay.history.get(job_id, [])),
                     describe_history(replay.history.get(job_id, [])) or "not in the AOF")
            for job_id in job_ids}
