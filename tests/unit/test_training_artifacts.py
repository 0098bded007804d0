"""LocalDirectoryStore: checkpoints and final models, atomic against crashes and SIGKILL."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from workers.training.artifacts import LocalDirectoryStore


def _state(value: float) -> dict:
    return {"step": int(value), "weights": torch.full((4,), value), "curve": [value], "name": "x"}


def test_checkpoints_round_trip_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path, keep_last=2)
    assert store.latest_checkpoint("job-1") is None
    for step in (10, 20, 30):
        location = store.save_checkpoint("job-1", step, _state(step))
        assert Path(location).is_file()
    assert store.latest_checkpoint("job-1") == 30
    loaded = store.load_checkpoint("job-1", 30)
    assert torch.equal(loaded["weights"], torch.full((4,), 30.0)) and loaded["curve"] == [30]
    assert store.load_checkpoint("job-1", 20)["step"] == 20
    with pytest.raises(FileNotFoundError):
        store.load_checkpoint("job-1", 10)
    assert store.latest_checkpoint("other-job") is None


def test_a_checkpoint_is_loaded_without_running_pickled_code(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)
    store.save_checkpoint("job", 1, {"payload": Path("/")})  # not a plain type: refused on load
    with pytest.raises(Exception, match="[Ww]eights only"):
        store.load_checkpoint("job", 1)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_debris(tmp_path: Path, monkeypatch) -> None:
    store = LocalDirectoryStore(tmp_path)
    store.save_checkpoint("job", 5, _state(5))

    def failing_save(obj: object, handle) -> None:
        handle.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        store.save_checkpoint("job", 10, _state(10))
    assert store.latest_checkpoint("job") == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "job").iterdir()) == ["step-00000005.pt"]


def test_sigkill_in_the_middle_of_a_write_never_exposes_a_corrupt_latest_checkpoint(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)
    store.save_checkpoint("job", 1, {"w": torch.ones(1000)})
    child = os.fork()
    if child == 0:  # the writer: killed by SIGKILL half-way through its second checkpoint
        try:
            def killed_while_writing(obj: object, handle) -> None:
                handle.write(b"half a checkpoint")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = killed_while_writing
            store.save_checkpoint("job", 2, {"w": torch.zeros(1000)})
        finally:
            os._exit(1)  # only reached if the kill did not happen
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert store.latest_checkpoint("job") == 1
    assert torch.equal(store.load_checkpoint("job", 1)["w"], torch.ones(1000))
    leftovers = [p.name for p in (tmp_path / "checkpoints" / "job").iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the killed writer's temporary file, ignored by readers
    store.save_checkpoint("job", 3, {"w": torch.zeros(1000)})
    assert store.latest_checkpoint("job") == 3


def test_a_model_is_published_whole_and_replaces_an_earlier_one(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)
    with pytest.raises(FileNotFoundError):
        store.model_directory("job")

    def write(version: str):
        def writer(directory: Path) -> None:
            (directory / "weights.bin").write_text(version)
            (directory / "sub").mkdir()
            (directory / "sub" / "config.json").write_text("{}")
        return writer

    first = store.save_model("job", write("v1"))
    assert Path(first) == store.model_directory("job")
    assert (Path(first) / "weights.bin").read_text() == "v1"
    second = store.save_model("job", write("v2"))
    assert second == first and (Path(second) / "weights.bin").read_text() == "v2"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["job"]


def test_a_writer_that_fails_publishes_nothing(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)

    def broken(directory: Path) -> None:
        (directory / "weights.bin").write_text("half")
        raise RuntimeError("serialisation failed")

    with pytest.raises(RuntimeError):
        store.save_model("job", broken)
    with pytest.raises(FileNotFoundError):
        store.model_directory("job")
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize("job_id", ["", "..", "../escape", "a/b", ".hidden", "x" * 200, "sp ace"])
def test_job_ids_that_are_not_safe_directory_names_are_refused(tmp_path: Path, job_id: str) -> None:
    store = LocalDirectoryStore(tmp_path)
    with pytest.raises(ValueError, match="job id"):
        store.latest_checkpoint(job_id)
    with pytest.raises(ValueError, match="job id"):
        store.save_model(job_id, lambda directory: None)


def test_celery_task_ids_are_valid_job_ids(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)
    store.save_checkpoint("2f1c6a1e-8d6b-4b8e-9f0a-3c2d1b0a9e8f", 0, {"x": 1})
    assert store.latest_checkpoint("2f1c6a1e-8d6b-4b8e-9f0a-3c2d1b0a9e8f") == 0
