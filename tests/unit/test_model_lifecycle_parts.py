"""The pure parts of the model lifecycle: model references, commands, serving plans, the consumer's view of
versions, which workers a command goes to, how replies are gathered, and the memory estimate."""

from __future__ import annotations

import json

import pytest

from producer import InvalidRequestError, NoMatchingWorkerError
from producer.contract import ClassifyRequest, EmbedRequest, ErrorCode, ModelKind, TrainRequest, inference_queue
from producer.contract.lifecycle import ModelCommandReply, ModelOp, ReplyStatus
from producer.core.model_control import Replies, new_command, parse_workers, select_workers, trained_model_servers
from producer.errors import JobFailedError
from workers.serving import memory_budget
from workers.serving.registry import ModelSpec, load_registry
from workers.serving.runtime import ConsumerRuntime, ModelRetired
from workers.serving.serving_plan import ServingPlan
from workers.settings import WorkerSettings


def card(ref: str, kind: str = "classify") -> dict:
    return {"name": ref, "kind": kind, "queue": inference_queue(kind, ref), "input_kind": "features",
            "labels": ["a", "b"], "dim": None, "features": 4, "max_seq_len": 8, "tokenizer": None, "slots": None,
            "device": "cpu", "dtype": "float32", "load": {}}


# --- references and commands -----------------------------------------------------------------------------


def test_jobs_may_pin_a_version_and_its_queue_is_the_reference():
    assert EmbedRequest(texts=["x"], model="minilm@2024.06").model == "minilm@2024.06"
    assert inference_queue(ModelKind.CLASSIFY, "digits@2") == "fleet.classify.digits@2"
    assert inference_queue(ModelKind.CLASSIFY, "digits") == "fleet.classify.digits"
    for bad in ("digits@", "digits@2@3", "Digits@2", "digits@-2", "@2"):
        with pytest.raises(ValueError, match="pattern"):
            ClassifyRequest(inputs=[[1.0]], model=bad)
        with pytest.raises(ValueError, match="name@version"):
            inference_queue(ModelKind.CLASSIFY, bad)


def test_serve_on_needs_a_name_to_serve_and_a_known_device():
    assert TrainRequest(kind="mlp", register_as="digits@3", serve_on="cpu").serve_on == "cpu"
    with pytest.raises(ValueError, match="serve_on needs register_as"):
        TrainRequest(kind="mlp", serve_on="cpu")
    with pytest.raises(ValueError, match="serve_on"):
        TrainRequest(kind="mlp", register_as="x", serve_on="tpu")


def test_commands_are_checked_before_anything_is_sent():
    command = new_command(ModelOp.SWITCH, "digits", "2", drain_grace_s=1.5)
    assert command.target == "digits@2" and command.drain_grace_s == 1.5
    with pytest.raises(InvalidRequestError, match="switch needs the version"):
        new_command(ModelOp.SWITCH, "digits")
    with pytest.raises(InvalidRequestError, match="without a version"):
        new_command(ModelOp.SWITCH, "digits@1", "2")
    with pytest.raises(InvalidRequestError, match="to is for switch only"):
        new_command(ModelOp.LOAD, "digits", "2")
    with pytest.raises(InvalidRequestError, match="model"):
        new_command(ModelOp.LOAD, "Not A Name")


def test_a_refusal_that_leaves_the_worker_as_asked_is_settled():
    def reply(op, code):
        return ModelCommandReply(worker="w", op=op, model="m", status=ReplyStatus.REFUSED, code=code)

    assert reply(ModelOp.LOAD, ErrorCode.ALREADY_LOADED.value).settled
    assert reply(ModelOp.UNLOAD, ErrorCode.NOT_LOADED.value).settled
    assert not reply(ModelOp.LOAD, ErrorCode.INSUFFICIENT_MEMORY.value).settled
    assert not reply(ModelOp.SWITCH, ErrorCode.NOT_LOADED.value).settled


# --- serving plans ---------------------------------------------------------------------------------------


def test_a_plan_consumes_each_version_and_its_current_version_takes_the_names_queue():
    plan = ServingPlan.serving([card("minilm", "embed"), card("digits@1")])
    assert plan.queues() == {"fleet.embed.minilm", "fleet.classify.digits@1", "fleet.classify.digits"}
    assert plan.announced() == ["digits", "digits@1", "minilm"]
    assert plan.catalog_entries()["digits"] == {"kind": "classify", "queue": "fleet.classify.digits",
                                                "current": "digits@1"}
    assert "current" not in plan.catalog_entries()["minilm"]


def test_a_switch_is_one_plan_in_which_the_names_queue_never_stops():
    before = ServingPlan.serving([card("digits@1")])
    loading = before.with_card(card("digits@2"))
    assert loading.queues() == before.queues(), "a version loading takes no job yet"
    switched = loading.consume("digits@2", make_current=True).retire({"digits@1"})
    assert switched.version > before.version
    assert switched.queues() == {"fleet.classify.digits", "fleet.classify.digits@2"}
    assert switched.queue_models()["fleet.classify.digits"] == "digits@2"
    assert set(switched.cards) == {"digits@1", "digits@2"}, "the old version drains before it is dropped"
    assert set(switched.without({"digits@1"}).cards) == {"digits@2"}


def test_retiring_the_current_version_passes_the_name_on_or_stops_its_queue():
    plan = ServingPlan.serving([card("digits@1"), card("digits@2")], current={"digits": "digits@1"})
    assert plan.current == {"digits": "digits@1"}
    assert plan.retire({"digits@1"}, successor="digits@2").current == {"digits": "digits@2"}
    gone = plan.retire({"digits@1", "digits@2"})
    assert gone.queues() == set() and gone.announced() == []


def test_a_plan_crosses_the_pipe_unchanged():
    plan = ServingPlan.serving([card("digits@1")]).with_card(card("minilm", "embed")).consume("minilm",
                                                                                             make_current=False)
    assert ServingPlan.from_message(json.loads(json.dumps(plan.message()))) == plan


# --- the consumer's view --------------------------------------------------------------------------------


def test_a_consumer_resolves_names_to_current_versions_and_hands_back_jobs_of_models_that_left():
    plan = ServingPlan.serving([card("digits@1")])
    runtime = ConsumerRuntime.from_plan(plan, settings=WorkerSettings(), device="cpu", client=None)
    assert runtime.model("digits", ModelKind.CLASSIFY).name == "digits@1"
    switching = plan.with_card(card("digits@2")).consume("digits@2", make_current=True).retire({"digits@1"})
    runtime.adopt(switching, {})
    assert runtime.model("digits", ModelKind.CLASSIFY).name == "digits@2"
    assert runtime.model("digits@1", ModelKind.CLASSIFY).name == "digits@1", "received before: it finishes"
    runtime.adopt(switching.without({"digits@1"}), {})
    with pytest.raises(ModelRetired):
        runtime.model("digits@1", ModelKind.CLASSIFY)
    runtime.adopt(ServingPlan(99), {})
    with pytest.raises(ModelRetired):
        runtime.model("digits", ModelKind.CLASSIFY)
    with pytest.raises(JobFailedError) as refused:
        runtime.model("never-served", ModelKind.CLASSIFY)
    assert refused.value.code is ErrorCode.UNKNOWN_MODEL


# --- where commands go, and their replies ---------------------------------------------------------------


WORKERS = parse_workers([
    json.dumps({"name": "gpu-a@h1", "device": "cuda:0", "models": ["digits", "digits@1"], "serve_trained": True}),
    json.dumps({"name": "cpu-b@h2", "device": "cpu", "models": ["minilm"], "serve_trained": True}),
    json.dumps({"name": "cpu-c@h2", "device": "cpu", "models": ["minilm", "digits", "digits@2"]}),
    None, "not json",
])


def test_commands_go_to_the_workers_the_selector_names_or_that_serve_the_model():
    assert [w.name for w in WORKERS] == ["cpu-b@h2", "cpu-c@h2", "gpu-a@h1"]
    assert select_workers(WORKERS, new_command(ModelOp.LOAD, "x")) == ["cpu-b@h2", "cpu-c@h2", "gpu-a@h1"]
    assert select_workers(WORKERS, new_command(ModelOp.UNLOAD, "digits")) == ["cpu-c@h2", "gpu-a@h1"]
    assert select_workers(WORKERS, new_command(ModelOp.UNLOAD, "digits@1")) == ["gpu-a@h1"]
    assert select_workers(WORKERS, new_command(ModelOp.SWITCH, "digits", "3")) == ["cpu-c@h2", "gpu-a@h1"]
    assert select_workers(WORKERS, new_command(ModelOp.LOAD, "x"), "cpu-*") == ["cpu-b@h2", "cpu-c@h2"]
    assert select_workers(WORKERS, new_command(ModelOp.LOAD, "x"), "gpu-a, cpu-b@h2") == ["cpu-b@h2", "gpu-a@h1"]
    with pytest.raises(NoMatchingWorkerError, match="no live worker matches tpu-"):
        select_workers(WORKERS, new_command(ModelOp.LOAD, "x"), "tpu-*")
    with pytest.raises(NoMatchingWorkerError, match="no live worker serves ghost"):
        select_workers(WORKERS, new_command(ModelOp.UNLOAD, "ghost"))


def test_trained_models_go_to_serve_trained_workers_on_the_asked_device():
    assert trained_model_servers(WORKERS, "cpu") == ["cpu-b@h2"]
    assert trained_model_servers(WORKERS, "cuda") == ["gpu-a@h1"]
    assert trained_model_servers(WORKERS, "any") == ["cpu-b@h2", "gpu-a@h1"]
    assert trained_model_servers(WORKERS, "mps") == []


def test_every_target_gets_one_reply_and_silence_is_no_reply():
    command = new_command(ModelOp.LOAD, "minilm")
    replies = Replies(command, ["a", "b", "c"], deadline=100.0)
    assert replies.broadcast(now=99.0)["timeout"] == 1.0
    assert replies.broadcast(now=0.0)["destination"] == ["a", "b", "c"]
    refused = ModelCommandReply(worker="b", op=ModelOp.LOAD, model="minilm", status=ReplyStatus.REFUSED,
                                code="invalid_input")
    replies.accept_acks([{"a": {"accepted": True}}, {"b": refused.model_dump(mode="json")}, {"z": {"accepted": True}}])
    assert replies.waiting == {"a"} and replies.next_wait(now=50.0) == 1.0
    replies.accept_reply(b"garbage")
    replies.accept_reply(ModelCommandReply(worker="a", op=ModelOp.LOAD, model="minilm",
                                           status=ReplyStatus.LOADED).model_dump_json())
    assert replies.next_wait(now=50.0) is None
    result = replies.result()
    assert [(r.worker, r.status) for r in result] == [("a", ReplyStatus.LOADED), ("b", ReplyStatus.REFUSED),
                                                       ("c", ReplyStatus.NO_REPLY)]
    assert "did not answer" in result[2].message


# --- registry and memory --------------------------------------------------------------------------------


def test_a_registry_names_versions_as_quoted_keys(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "registry.toml").write_text('[models."digits@1"]\nkind = "classify"\nsource = "dir:v1"\n')
    spec = load_registry(tmp_path / "registry.toml")["digits@1"]
    assert (spec.base_name, spec.queue) == ("digits", "fleet.classify.digits@1")


def test_the_estimate_weighs_the_files_from_pretrained_reads(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 5000)  # not read when safetensors are there
    with open(tmp_path / "model-00002.safetensors", "wb") as sparse:
        sparse.truncate(2**40)
    spec = ModelSpec(name="big", kind="embed", source=f"dir:{tmp_path}")
    assert memory_budget.estimated_bytes(spec) == int((2**40 + 1000) * memory_budget.SIZE_FACTOR)
    assert 0 < memory_budget.available_bytes("cpu") < memory_budget.estimated_bytes(spec)
    assert memory_budget.in_use_bytes("cpu") > 0
