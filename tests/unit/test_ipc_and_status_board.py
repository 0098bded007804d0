"""The hand-off's wire format (workers/serving/ipc.py) and the group's status board (status_board.py)."""

from __future__ import annotations

import numpy as np
import pytest

from workers.process.status_board import COMPUTING_BYTES, State, StatusBoard
from workers.serving import ipc


def test_token_ids_round_trip_with_their_lengths():
    id_lists = [[101, 7592, 102], [101, 102], [101] + list(range(1000, 1300)) + [102]]
    flat, lengths = ipc.encode_tokens(id_lists)
    assert [ids.tolist() for ids in ipc.decode_tokens(flat, lengths)] == id_lists


def test_tokens_whose_lengths_do_not_add_up_are_refused():
    flat, _ = ipc.encode_tokens([[1, 2, 3]])
    _, lengths = ipc.encode_tokens([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="do not split"):
        ipc.decode_tokens(flat, lengths)


def test_a_float32_matrix_round_trips_exactly_and_a_wrong_shape_is_refused():
    rows = np.random.default_rng(0).standard_normal((5, 384)).astype(np.float32)
    shape, raw = ipc.encode_matrix(rows)
    assert shape == [5, 384] and np.array_equal(ipc.decode_matrix(shape, raw), rows)
    with pytest.raises(ValueError, match="not a 5 x 385 matrix"):
        ipc.decode_matrix([5, 385], raw)


def test_header_and_frames_round_trip():
    frames = ipc.pack({"op": "infer", "rid": 7, "model": "minilm"}, b"\x00\x01", b"")
    header, payloads = ipc.unpack(frames)
    assert header == {"op": "infer", "rid": 7, "model": "minilm"} and payloads == [b"\x00\x01", b""]


def test_board_slots_are_shared_between_attached_views(tmp_path):
    board = StatusBoard.create(tmp_path / "board", consumers=3)
    other = StatusBoard.attach(tmp_path / "board")
    board.set_device(State.READY, pid=1234, metrics_port=9000)
    board.batch_started(2, ["job-a", "job-b"])
    device = other.device()
    assert (device.pid, device.state, device.metrics_port) == (1234, State.READY, 9000)
    assert [(c.slot, c.job_ids) for c in device.computing] == [(2, ["job-a", "job-b"])]
    board.batch_finished(2)
    assert other.device().computing == [] and other.device().batches == 1
    other.set_consumer(1, State.READY, pid=55)
    other.consumer_tick(1, in_flight=4, jobs_done=10)
    consumer = board.consumer(1)
    assert (consumer.pid, consumer.state, consumer.in_flight, consumer.jobs_done) == (55, State.READY, 4, 10)
    assert [c.state for c in board.all_consumers()] == [State.STARTING, State.READY, State.STARTING]


def test_a_batch_too_large_to_record_charges_nobody(tmp_path):
    board = StatusBoard.create(tmp_path / "board", consumers=1)
    board.batch_started(0, [f"job-{i:0{COMPUTING_BYTES}d}" for i in range(2)])
    assert [c.job_ids for c in board.device().computing] == [[]]


def test_a_file_that_is_not_a_board_is_refused(tmp_path):
    path = tmp_path / "not-a-board"
    path.write_bytes(b"x" * 64)
    with pytest.raises(ValueError, match="not a Fleet status board"):
        StatusBoard.attach(path)
