"""Device pinning and worker planning, against fake device lists (pure unit tests)."""

from __future__ import annotations

import pytest

from workers.process.devices import DeviceError, parse_device, pin_cuda_device
from workers.process.supervisor import PlanError, plan_workers


def test_cuda_index_pins_one_gpu_and_becomes_cuda0():
    env: dict[str, str] = {}
    assert pin_cuda_device("cuda:1", env) == "cuda:0"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"


def test_cuda_index_is_relative_to_already_visible_gpus():
    env = {"CUDA_VISIBLE_DEVICES": "4,6"}
    assert pin_cuda_device("cuda:1", env) == "cuda:0"
    assert env["CUDA_VISIBLE_DEVICES"] == "6"


def test_cuda_index_beyond_visible_gpus_is_an_error():
    with pytest.raises(DeviceError, match="lists 2"):
        pin_cuda_device("cuda:2", {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_cpu_and_auto_are_not_pinned():
    env: dict[str, str] = {}
    assert pin_cuda_device("cpu", env) == "cpu" and pin_cuda_device("auto", env) == "auto"
    assert env == {}


@pytest.mark.parametrize("bad", ["gpu", "cuda", "cuda:x", "tpu:0", ""])
def test_device_syntax_is_checked(bad):
    with pytest.raises(DeviceError):
        parse_device(bad)


def test_all_gives_one_worker_per_gpu_each_seeing_one_gpu():
    plans = plan_workers("all", ["0", "1", "2"], "host")
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "1", "2"]
    assert {p.device for p in plans} == {"cuda:0"}
    assert len({p.name for p in plans}) == 3


def test_explicit_gpu_list_must_be_visible():
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plan_workers("1, 0", ["0", "1"], "h")] == ["1", "0"]
    with pytest.raises(PlanError, match="not visible"):
        plan_workers("0,3", ["0", "1"], "h")
    with pytest.raises(PlanError, match="twice"):
        plan_workers("0,0", ["0", "1"], "h")


def test_all_without_gpus_is_an_error():
    with pytest.raises(PlanError, match="no GPU"):
        plan_workers("all", [], "h")


def test_cpu_workers_hide_gpus():
    plans = plan_workers("cpu:2", ["0"], "h")
    assert [p.device for p in plans] == ["cpu", "cpu"]
    assert all(p.env["CUDA_VISIBLE_DEVICES"] == "" for p in plans)
    assert len({p.name for p in plans}) == 2
    with pytest.raises(PlanError):
        plan_workers("cpu:0", [], "h")
