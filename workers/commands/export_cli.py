"""``fleet models export NAME --format onnx --out DIR [--quantize int8]``: export a model to ONNX.

``NAME`` is found as a worker finds it: in the registry file (``--registry``, else
``FLEET_MODEL_REGISTRY``, else the default registry), then among the models training jobs
registered in Redis (``REDIS_URL``; skipped with a note if Redis does not answer). The export is
checked against PyTorch before anything is written (``workers.serving.onnx_export``).

Exit status (``workers/commands/exit_codes.py``): ``OK`` written; ``FAILURE`` refused because the
graph's outputs differ from PyTorch's (nothing written); ``REFUSED`` nothing to export (unknown
name, a model Fleet does not export, an output directory that is not an earlier export).
"""

from __future__ import annotations

from pathlib import Path

import click

from workers.commands.exit_codes import ExitCode


def _registry(registry_path: str | None):
    """The registry file's models plus Redis' trained ones, and a note if Redis could not be asked."""
    import redis

    from producer import keys
    from producer.redis_connection import RedisURLError, redis_client, text
    from workers.serving.registry import load_registry, with_trained_models
    from workers.settings import WorkerSettings

    settings = WorkerSettings(model_registry=registry_path) if registry_path else WorkerSettings()
    registry = load_registry(settings.model_registry)
    try:
        client = redis_client(settings, patient=False, socket_connect_timeout=2, socket_timeout=2)
        trained = {text(name): text(raw) for name, raw in client.hgetall(keys.TRAINED_MODELS).items()}
    except (RedisURLError, redis.RedisError) as exc:
        return registry, f"trained models not looked up: Redis at REDIS_URL did not answer ({exc})"
    return with_trained_models(registry, trained), None


def run_export(name: str, out: str, *, quantize: str | None = None, registry_path: str | None = None) -> ExitCode:
    """Export model ``name`` to ONNX into ``out``; print what was written or why not; return the exit status."""
    from workers.observability.logs import configure_logging
    from workers.serving.registry import RegistryError, select

    configure_logging("WARNING")  # the exporter's libraries log a line per graph rewrite at INFO
    note = None
    try:
        registry, note = _registry(registry_path)
        [spec] = select(registry, [name])
    except RegistryError as exc:
        click.echo(f"fleet models export: {exc}" + (f"; {note}" if note else ""), err=True)
        return ExitCode.REFUSED

    from workers.serving.onnx_export import NotExportable, OutputMismatch, export_model

    try:
        manifest = export_model(spec, Path(out), quantize=quantize)
    except (NotExportable, RegistryError) as exc:
        click.echo(f"fleet models export: {exc}", err=True)
        return ExitCode.REFUSED
    except OutputMismatch as exc:
        click.echo(f"fleet models export: refused: {exc}", err=True)
        return ExitCode.FAILURE
    directory = Path(out).resolve()
    click.echo(f"exported {name} ({manifest.kind.value}, {manifest.precision}, opset {manifest.opset}) to {directory}")
    for agreement in manifest.agreement:
        click.echo(f"  {agreement.metric} against {agreement.against} over {agreement.samples} inputs: "
              f"worst {agreement.worst:.6g}, mean {agreement.mean:.6g}")
    click.echo(f"serve it with ONNX Runtime: add to your registry\n\n[models.{name}-onnx]\n"
          f"kind = \"{manifest.kind.value}\"\nsource = \"dir:{directory}\"\nbackend = \"onnxruntime\"")
    return ExitCode.OK
