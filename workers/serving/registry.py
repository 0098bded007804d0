"""The model registry: which models exist, where their weights live and how to serve them.

Read from one TOML file (``FLEET_MODEL_REGISTRY`` or ``--registry``). Pure data: nothing
here imports torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tomllib
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from producer.contract import MODEL_REF_PATTERN, ModelKind, inference_queue, split_model_ref
from workers.serving.generation.limits import EngineLimits


class RegistryError(ValueError):
    """The registry file is missing, malformed, or names a model or source that cannot be used."""


class DType(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class Backend(str, Enum):
    """What runs the model: PyTorch on the source directory, or ONNX Runtime on an ONNX export
    directory (``fleet models export``; needs the ``onnx`` extra)."""

    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"


class ModelSpec(BaseModel):
    """One servable model. ``max_wait_ms`` is how long the batcher may hold a job to fill a batch.

    ``name`` is the model's reference: a name, or ``name@version`` for one version of a model
    (``[models."digits-mlp@2"]`` in the registry file). Every version of a name serves one kind.

    Generate models: ``max_batch_size`` is the most sequences decoding at once; ``max_seq_len``
    bounds prompt plus new tokens; ``max_prompt_tokens`` (default ``max_seq_len - 1``) the
    prompt; ``kv_cache_tokens`` (default ``max_batch_size * max_seq_len``) the KV cache, in token
    positions (see ``workers.serving.generation.limits.EngineLimits``).

    With ``backend = "onnxruntime"`` the source is an ONNX export directory; only ``embed`` and
    ``classify`` models are exported, and their precision is the export's (``dtype`` stays fp32).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=MODEL_REF_PATTERN)
    kind: ModelKind
    source: str
    dtype: DType = DType.FP32
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    max_seq_len: int = Field(256, ge=8, le=32_768)
    max_prompt_tokens: int | None = Field(None, ge=1)
    kv_cache_tokens: int | None = Field(None, ge=1)
    backend: Backend = Backend.TORCH
    #: A resident-model class of your own, ``module:Class`` (advanced): built as ``Class(spec, device)``, it
    #: provides the interface of ``workers/serving/models/`` (``run_batch``, ``warmup``, ...); None: Fleet's.
    impl: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.partition(":")[0]
        if scheme not in ("package", "dir", "hub"):
            raise ValueError(f"source {value!r} must start with package:, dir: or hub:")
        if scheme == "hub" and "@" not in value:
            raise ValueError(f"hub source {value!r} needs a pinned revision: hub:<org>/<name>@<revision>")
        return value

    @model_validator(mode="after")
    def _generation_limits_fit(self) -> ModelSpec:
        if self.kind is not ModelKind.GENERATE and (self.max_prompt_tokens or self.kv_cache_tokens):
            raise ValueError("max_prompt_tokens and kv_cache_tokens apply to generate models only")
        if self.kind is ModelKind.GENERATE:
            self.engine_limits()  # raises ValueError naming the limit that does not fit
        return self

    @model_validator(mode="after")
    def _backend_serves_it(self) -> ModelSpec:
        if self.backend is Backend.ONNXRUNTIME:
            if self.kind is ModelKind.GENERATE:
                raise ValueError("backend onnxruntime serves embed and classify models, not generate")
            if self.dtype is not DType.FP32:
                raise ValueError("backend onnxruntime takes its precision from the export: leave dtype at fp32")
            if self.source.startswith("hub:"):
                raise ValueError("backend onnxruntime needs a local export directory (dir: or package:), not hub:")
        return self

    @property
    def queue(self) -> str:
        """The queue of jobs for exactly this model (``fleet.<kind>.<name>[@<version>]``)."""
        return inference_queue(self.kind, self.name)

    @property
    def base_name(self) -> str:
        """The name without its version (``digits-mlp`` for ``digits-mlp@2``)."""
        return split_model_ref(self.name)[0]

    def engine_limits(self) -> EngineLimits:
        """The generation engine's limits for this (generate) model."""
        return EngineLimits(max_sequences=self.max_batch_size, max_seq_len=self.max_seq_len,
                            max_prompt_tokens=self.max_prompt_tokens or self.max_seq_len - 1,
                            kv_cache_tokens=self.kv_cache_tokens or self.max_batch_size * self.max_seq_len)


def load_registry(path: Path) -> dict[str, ModelSpec]:
    """Parse the registry file at ``path``; raise ``RegistryError`` with the reason on any problem."""
    try:
        document = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RegistryError(f"model registry {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"model registry {path} is not valid TOML: {exc}") from None
    models = document.get("models")
    if not isinstance(models, dict) or not models:
        raise RegistryError(f"model registry {path} has no [models.<name>] tables")
    specs: dict[str, ModelSpec] = {}
    for name, table in models.items():
        table = dict(table)
        if table.get("source", "").startswith("dir:"):
            table["source"] = "dir:" + str((Path(path).parent / table["source"][4:]).resolve())
        try:
            specs[name] = ModelSpec(name=name, **table)
        except ValidationError as exc:
            raise RegistryError(f"model {name!r} in {path}: {exc}") from None
    return specs


def with_trained_models(registry: dict[str, ModelSpec], trained: dict[str, str]) -> dict[str, ModelSpec]:
    """Add models registered by training jobs (name -> JSON entry) to ``registry``.

    The registry file wins on a name clash; a malformed entry raises ``RegistryError``.
    """
    merged = dict(registry)
    for name, raw in trained.items():
        if name in merged:
            continue
        try:
            merged[name] = ModelSpec(name=name, **json.loads(raw))
        except (ValueError, ValidationError) as exc:
            raise RegistryError(f"trained model {name!r}: {exc}") from None
    return merged


def select(registry: dict[str, ModelSpec], names: list[str]) -> list[ModelSpec]:
    """Return the specs of ``names`` in order, or raise ``RegistryError`` naming the unknown ones."""
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise RegistryError(f"models not in the registry: {', '.join(unknown)} (known: {', '.join(sorted(registry))})")
    return [registry[name] for name in names]


def resolve_source(spec: ModelSpec) -> tuple[str, str | None]:
    """Return ``(path_or_hub_id, revision)`` for ``from_pretrained``.

    ``package:`` and ``dir:`` resolve to a local directory (revision None) that holds a
    ``config.json``; for the onnxruntime backend the export's own checks judge the directory
    (``workers.serving.onnx_manifest``).
    ``hub:`` is refused when ``HF_HUB_OFFLINE`` is set, since nothing could be fetched.
    """
    scheme, _, rest = spec.source.partition(":")
    if scheme == "package":
        module, _, subdir = rest.partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise RegistryError(f"model {spec.name!r}: package {module!r} is not installed")
        directory = Path(list(found.submodule_search_locations)[0]) / subdir
    elif scheme == "dir":
        directory = Path(rest)
    else:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise RegistryError(f"model {spec.name!r}: hub source {rest!r} but HF_HUB_OFFLINE is set")
        repo, _, revision = rest.partition("@")
        return repo, revision
    if spec.backend is Backend.TORCH and not (directory / "config.json").is_file():
        raise RegistryError(f"model {spec.name!r}: {directory} holds no config.json")
    return str(directory), None
