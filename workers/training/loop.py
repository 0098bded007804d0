"""The training loop: AdamW with warmup and cosine decay, gradient accumulation, mixed
precision, checkpoint and resume, progress and cancellation.

Reproducibility: model initialisation is seeded (see ``build_workload``) and the order of
the training samples in epoch ``e`` is a pure function of ``(seed, e)``. The loop draws
no other random numbers, so a checkpoint's step fixes all randomness: a resumed run takes
the same steps as an uninterrupted one, and on CPU two runs of one request give identical
loss curves. (Global RNG state is deliberately neither saved nor restored: in a threads
pool it is shared with other jobs.)

Gradient accumulation: one optimizer step consumes a window of ``batch_size *
grad_accum_steps`` samples in micro-batches of ``batch_size``. Each micro-batch's loss
sum is divided by the number of samples in the whole window, so the accumulated gradient
equals that of one batch of the window (also for the last, shorter window of an epoch).
Models with batch statistics (the CNN's BatchNorm) see micro-batch statistics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from producer.contract.training import MAX_LOSS_CURVE_POINTS, TrainProgress, TrainRequest, TrainResult
from workers.training.artifacts import ArtifactStore
from workers.training.errors import TrainingConfigError
from workers.training.precision import autocast, check_precision, grad_scaler
from workers.training.workloads import Workload, build_workload

#: Version of the checkpoint layout written by ``_Run._checkpoint_state``.
CHECKPOINT_FORMAT = 1
#: The learning rate rises linearly over this fraction of all steps, then follows a cosine
#: from ``learning_rate`` down to ``_FINAL_LR_FRACTION`` of it.
_WARMUP_FRACTION = 0.05
_FINAL_LR_FRACTION = 0.1

ProgressCallback = Callable[[TrainProgress], None]
EpochCallback = Callable[[int, dict[str, float]], None]


def learning_rate_at(step: int, total_steps: int, peak: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) out of ``total_steps``."""
    warmup = max(1, round(_WARMUP_FRACTION * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (_FINAL_LR_FRACTION + (1 - _FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def downsample_loss_curve(curve: list[float], max_points: int = MAX_LOSS_CURVE_POINTS) -> list[float]:
    """``curve`` itself if it has at most ``max_points`` points; else the means of consecutive runs of
    ``s = ceil(len(curve) / max_points)`` points (the last run may be shorter), at most ``max_points``.

    This is the ``TrainResult.loss_curve`` contract: one float per step would make the result of a
    long job tens of megabytes of JSON. Checkpoints keep the full curve.
    """
    if len(curve) <= max_points:
        return list(curve)
    stride = math.ceil(len(curve) / max_points)
    return [math.fsum(curve[start:start + stride]) / len(curve[start:start + stride])
            for start in range(0, len(curve), stride)]


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` (0-based) visits ``n`` training samples."""
    generator = torch.Generator().manual_seed((seed << 20) + epoch)
    return torch.randperm(n, generator=generator)


def run_training(
    request: TrainRequest,
    device: torch.device | str,
    store: ArtifactStore,
    *,
    job_id: str,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: EpochCallback | None = None,
    progress_interval_s: float = 5.0,
) -> TrainResult:
    """Train ``request`` on ``device``, checkpointing through ``store`` under ``job_id``.

    If ``store`` holds a checkpoint of ``job_id``, training resumes from it. ``on_progress``
    is called after the first optimizer step, then at most every ``progress_interval_s``
    seconds, and at the end of every epoch. ``should_stop`` is polled before every
    optimizer step; once it returns True the loop writes a checkpoint and returns a result
    with ``cancelled=True`` (at most the step in flight finishes). ``on_epoch(epoch,
    metrics)`` is called at the end of each epoch (1-based) with ``train_loss`` (mean step
    loss of the epoch), ``learning_rate`` and ``epoch_seconds`` (time spent on the epoch in
    this run).

    Raises ``TrainingConfigError`` before training if the device cannot run the request's
    precision or the job's checkpoint was written by a different request, and
    ``ValueError`` for a job id the store cannot hold.
    """
    device = torch.device(device)
    check_precision(request.precision, device)
    resume_step = store.latest_checkpoint(job_id)
    run = _Run(request, device, build_workload(request, device), store, job_id)
    if resume_step is not None:
        run.restore(store.load_checkpoint(job_id, resume_step))
    return run.train(on_progress, should_stop or (lambda: False), on_epoch, progress_interval_s)


class _Run:
    """The state of one training run: workload, optimizer, scaler, step and loss curve."""

    def __init__(
        self, request: TrainRequest, device: torch.device, workload: Workload, store: ArtifactStore, job_id: str
    ) -> None:
        self.request, self.device, self.workload = request, device, workload
        self.store, self.job_id = store, job_id
        self.window = request.batch_size * request.grad_accum_steps
        self.steps_per_epoch = math.ceil(workload.n_train / self.window)
        self.total_steps = request.epochs * self.steps_per_epoch
        self.optimizer = _adamw(workload.model, request)
        self.scaler = grad_scaler(request.precision, device)
        self.step = 0
        self.loss_curve: list[float] = []
        self.val_loss_start: float | None = None
        self.resumed_from_step = 0
        self.last_checkpoint: tuple[int, str] | None = None  # (step, location) written by this run
        self._order: tuple[int, torch.Tensor] | None = None

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by ``_checkpoint_state`` for the same request."""
        if state.get("format") != CHECKPOINT_FORMAT or state.get("request") != self.request.model_dump_json():
            raise TrainingConfigError(
                f"the checkpoint of job {self.job_id!r} was written by a different request or format; "
                "resubmit under a new job id"
            )
        self.workload.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = self.resumed_from_step = state["step"]
        self.loss_curve = list(state["loss_curve"])
        self.val_loss_start = state["val_loss_start"]

    def train(
        self,
        on_progress: ProgressCallback | None,
        should_stop: Callable[[], bool],
        on_epoch: EpochCallback | None,
        progress_interval_s: float,
    ) -> TrainResult:
        started = time.monotonic()
        if self.val_loss_start is None:
            self.val_loss_start = self.workload.evaluate()["val_loss"]
        progress = _ProgressReporter(on_progress, progress_interval_s, self)
        epoch_started = started
        while self.step < self.total_steps:
            if should_stop():
                location = self._checkpoint()
                return self._result(location, {"train_seconds": time.monotonic() - started}, cancelled=True)
            loss, samples = self._optimizer_step()
            self.loss_curve.append(loss)
            self.step += 1
            if self.step % self.request.checkpoint_every_steps == 0 or self.step == self.total_steps:
                self._checkpoint()
            epoch_end = self.step % self.steps_per_epoch == 0
            progress.step_done(samples, force=epoch_end)
            if epoch_end:
                if on_epoch is not None:
                    on_epoch(self.step // self.steps_per_epoch, self._epoch_metrics(time.monotonic() - epoch_started))
                epoch_started = time.monotonic()
        metrics = self.workload.evaluate()
        artifact = self.store.save_model(self.job_id, self.workload.save)
        metrics["train_seconds"] = time.monotonic() - started
        return self._result(artifact, metrics, cancelled=False)

    def _optimizer_step(self) -> tuple[float, int]:
        """Take optimizer step ``self.step``; return its mean loss and its number of samples."""
        learning_rate = learning_rate_at(self.step, self.total_steps, self.request.learning_rate)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        indices = self._window_indices()
        loss_total = torch.zeros((), device=self.device)
        for micro_batch in indices.split(self.request.batch_size):
            with autocast(self.request.precision, self.device):
                loss_sum = self.workload.loss_sum(micro_batch)
            loss = loss_sum.float() / len(indices)
            self.scaler.scale(loss).backward()
            loss_total += loss.detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total.item(), len(indices)

    @property
    def epoch(self) -> int:
        """The 0-based epoch that optimizer step ``self.step`` belongs to."""
        return self.step // self.steps_per_epoch

    def _window_indices(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            order = epoch_order(self.request.seed, self.epoch, self.workload.n_train).to(self.device)
            self._order = (self.epoch, order)
        start = (self.step % self.steps_per_epoch) * self.window
        return self._order[1][start : start + self.window]

    def _checkpoint(self) -> str:
        """Write the checkpoint of the current step (once) and return its location."""
        if self.last_checkpoint is None or self.last_checkpoint[0] != self.step:
            location = self.store.save_checkpoint(self.job_id, self.step, self._checkpoint_state())
            self.last_checkpoint = (self.step, location)
        return self.last_checkpoint[1]

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "request": self.request.model_dump_json(),
            "step": self.step,
            "model": self.workload.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss_curve": list(self.loss_curve),
            "val_loss_start": self.val_loss_start,
        }

    def _epoch_metrics(self, seconds: float) -> dict[str, float]:
        epoch_losses = self.loss_curve[-self.steps_per_epoch :]
        return {
            "train_loss": sum(epoch_losses) / len(epoch_losses),
            "learning_rate": learning_rate_at(self.step - 1, self.total_steps, self.request.learning_rate),
            "epoch_seconds": seconds,
        }

    def _result(self, artifact: str, metrics: dict[str, float], *, cancelled: bool) -> TrainResult:
        return TrainResult(
            kind=self.request.kind,
            dataset=self.request.dataset,
            device=str(self.device),
            metrics={**metrics, "val_loss_start": self.val_loss_start},
            loss_curve=downsample_loss_curve(self.loss_curve),
            steps=self.step,
            resumed_from_step=self.resumed_from_step,
            artifact=artifact,
            cancelled=cancelled,
        )


class _ProgressReporter:
    """Calls ``on_progress`` after the first step of a run, then at most every ``interval_s``
    seconds unless forced. Throughput and ETA count only this run's steps."""

    def __init__(self, on_progress: ProgressCallback | None, interval_s: float, run: _Run) -> None:
        self.on_progress, self.interval_s, self.run = on_progress, interval_s, run
        self.started = time.monotonic()
        self.first_step = run.step
        self.samples = 0
        self.last_report = -math.inf

    def step_done(self, samples: int, *, force: bool) -> None:
        self.samples += samples
        now = time.monotonic()
        if self.on_progress is None or (not force and now - self.last_report < self.interval_s):
            return
        self.last_report = now
        run = self.run
        elapsed = max(now - self.started, 1e-9)
        seconds_per_step = elapsed / (run.step - self.first_step)
        self.on_progress(
            TrainProgress(
                epoch=(run.step - 1) // run.steps_per_epoch + 1,
                epochs=run.request.epochs,
                step=run.step,
                total_steps=run.total_steps,
                loss=run.loss_curve[-1],
                learning_rate=learning_rate_at(run.step - 1, run.total_steps, run.request.learning_rate),
                samples_per_s=self.samples / elapsed,
                eta_s=seconds_per_step * (run.total_steps - run.step),
            )
        )


def _adamw(model: torch.nn.Module, request: TrainRequest) -> torch.optim.AdamW:
    """AdamW with the request's settings; weight decay applies to weight matrices and
    kernels only, not to biases, norm scales or other one-dimensional parameters."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": request.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups,
        lr=request.learning_rate,
        betas=request.betas,
        eps=request.eps,
    )
