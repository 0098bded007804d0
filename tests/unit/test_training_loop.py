"""The training loop's mechanics on short real MLP runs: errors before training, gradient
accumulation, progress, epochs, cancellation, checkpoints, mixed precision."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from producer.contract.training import TrainProgress, TrainRequest
from workers.training.artifacts import LocalDirectoryStore
from workers.training.errors import TrainingConfigError
from workers.training.loop import downsample_loss_curve, learning_rate_at, run_training
from workers.training.models import load_classifier

# One torch thread (conftest.one_thread): the suite shares two CPU cores with other work.
pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(**fields: object) -> TrainRequest:
    return TrainRequest(kind="mlp", **{"epochs": 2, **fields})


def _nothing_trained(store_root: Path) -> bool:
    return not store_root.exists() or not any(store_root.rglob("*.pt"))


def test_fp16_on_cpu_is_refused_before_anything_trains(tmp_path: Path) -> None:
    progress: list[TrainProgress] = []
    with pytest.raises(TrainingConfigError, match="fp16 needs a CUDA device"):
        run_training(_mlp(precision="fp16"), "cpu", LocalDirectoryStore(tmp_path), job_id="j",
                     on_progress=progress.append)
    assert progress == [] and _nothing_trained(tmp_path)


def test_an_unsafe_job_id_is_refused_before_anything_trains(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="job id"):
        run_training(_mlp(), "cpu", LocalDirectoryStore(tmp_path), job_id="../other")
    assert _nothing_trained(tmp_path)


def test_a_checkpoint_of_another_request_under_the_same_job_id_is_refused(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)
    run_training(_mlp(), "cpu", store, job_id="j", should_stop=lambda: True)
    with pytest.raises(TrainingConfigError, match="different request"):
        run_training(_mlp(learning_rate=0.02), "cpu", store, job_id="j")


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    peak, total = 0.01, 200  # warmup: 10 steps
    assert learning_rate_at(0, total, peak) == pytest.approx(0.001)
    assert learning_rate_at(9, total, peak) == pytest.approx(peak)
    rates = [learning_rate_at(step, total, peak) for step in range(10, total)]
    assert all(a >= b for a, b in itertools.pairwise(rates))
    assert rates[-1] == pytest.approx(0.1 * peak, rel=1e-3)


@pytest.mark.parametrize(("micro_batch", "accum"), [(16, 4), (24, 3)])
def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path, micro_batch: int, accum: int) -> None:
    """k micro-batches of b samples take the same optimizer steps as batches of k*b, also over
    the last, shorter window of the epoch (1437 training samples)."""
    window = micro_batch * accum
    store = LocalDirectoryStore(tmp_path)
    common = {"epochs": 1, "learning_rate": 1e-3}
    accumulated = run_training(
        _mlp(**common, batch_size=micro_batch, grad_accum_steps=accum), "cpu", store, job_id="accumulated"
    )
    whole = run_training(_mlp(**common, batch_size=window), "cpu", store, job_id="whole")
    assert accumulated.steps == whole.steps == -(-1437 // window)
    accumulated_model, _ = load_classifier(accumulated.artifact)
    whole_model, _ = load_classifier(whole.artifact)
    differences = [
        (a - b).abs().max().item()
        for a, b in zip(accumulated_model.state_dict().values(), whole_model.state_dict().values())
    ]
    assert max(differences) < 1e-5
    assert accumulated.loss_curve == pytest.approx(whole.loss_curve, abs=1e-5)


def test_progress_is_rate_bounded_and_epochs_are_reported(tmp_path: Path) -> None:
    progress: list[TrainProgress] = []
    epochs: list[tuple[int, dict[str, float]]] = []
    result = run_training(
        _mlp(epochs=3), "cpu", LocalDirectoryStore(tmp_path), job_id="j",
        on_progress=progress.append, on_epoch=lambda epoch, metrics: epochs.append((epoch, metrics)),
        progress_interval_s=3600,
    )
    steps_per_epoch = result.steps // 3
    # Only the first step and the three epoch ends are reported under a one-hour interval.
    assert [p.step for p in progress] == [1, steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]
    assert [p.epoch for p in progress] == [1, 1, 2, 3]
    last = progress[-1]
    assert (last.total_steps, last.epochs, last.eta_s) == (result.steps, 3, 0.0)
    assert last.loss == result.loss_curve[-1] and last.samples_per_s > 0
    assert [epoch for epoch, _ in epochs] == [1, 2, 3]
    assert set(epochs[0][1]) == {"train_loss", "learning_rate", "epoch_seconds"}
    assert epochs[2][1]["train_loss"] < epochs[0][1]["train_loss"]


def test_cancel_before_the_first_step_leaves_a_checkpoint(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)
    result = run_training(_mlp(), "cpu", store, job_id="j", should_stop=lambda: True)
    assert result.cancelled and result.steps == 0 and result.loss_curve == []
    assert store.latest_checkpoint("j") == 0 and Path(result.artifact).is_file()
    assert set(result.metrics) == {"val_loss_start", "train_seconds"}
    with pytest.raises(FileNotFoundError):
        store.model_directory("j")


def test_a_finished_job_run_again_resumes_at_its_end_and_trains_nothing(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)
    first = run_training(_mlp(epochs=1), "cpu", store, job_id="j")
    progress: list[TrainProgress] = []
    again = run_training(_mlp(epochs=1), "cpu", store, job_id="j", on_progress=progress.append)
    assert again.resumed_from_step == again.steps == first.steps and progress == []
    assert again.loss_curve == first.loss_curve and again.artifact == first.artifact
    assert again.metrics["accuracy"] == first.metrics["accuracy"]


def test_bf16_autocast_trains_on_cpu(tmp_path: Path) -> None:
    result = run_training(_mlp(epochs=3, precision="bf16"), "cpu", LocalDirectoryStore(tmp_path), job_id="j")
    assert all(torch.isfinite(torch.tensor(result.loss_curve)))
    assert result.loss_curve[-1] < 0.5 * result.loss_curve[0]
    assert result.metrics["accuracy"] > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_mixed_precision_trains_and_resumes_on_cuda(tmp_path: Path, precision: str) -> None:
    store = LocalDirectoryStore(tmp_path)
    request = TrainRequest(kind="cnn", epochs=3, precision=precision, checkpoint_every_steps=10)
    stop = {"after": 30}
    cancelled = run_training(request, "cuda", store, job_id="j", should_stop=lambda: stop["after"] <= 0,
                             on_progress=lambda p: stop.update(after=30 - p.step), progress_interval_s=0)
    assert cancelled.cancelled and cancelled.steps == 30 and cancelled.device.startswith("cuda")
    if precision == "fp16":
        assert store.load_checkpoint("j", 30)["scaler"]["scale"] > 0
    result = run_training(request, "cuda", store, job_id="j")
    assert result.resumed_from_step == 30 and all(torch.isfinite(torch.tensor(result.loss_curve)))
    assert result.metrics["accuracy"] > 0.9


def test_a_loss_curve_past_the_cap_becomes_means_of_consecutive_steps():
    curve = [float(step) for step in range(1, 2501)]  # 2,500 steps: stride ceil(2500 / 1000) = 3
    points = downsample_loss_curve(curve)
    assert len(points) == 834 and points[0] == 2.0 and points[1] == 5.0 and points[-1] == 2500.0
    assert downsample_loss_curve(curve[:1000]) == curve[:1000]
