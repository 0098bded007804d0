"""Observability: OpenTelemetry traces and metrics for the worker, and JSON logs."""
