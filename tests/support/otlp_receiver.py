"""A real OTLP receiver for tests: OTLP/HTTP (protobuf) and OTLP/gRPC on free local ports.

It decodes every request with ``opentelemetry-proto``'s ``Export*ServiceRequest`` messages,
exactly as a collector would, and keeps flattened copies of what arrived:

    receiver = OtlpReceiver().start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    # or receiver.grpc_endpoint with protocol grpc
    ...
    receiver.wait_for(lambda r: any(s.name == "fleet.forward" for s in r.spans()), timeout_s=30)
    receiver.stop()

OTLP/JSON is refused (415): Fleet's exporters send protobuf.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

_SPAN_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def any_value(value) -> Any:
    """An OTLP ``AnyValue`` as a plain Python value."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, which)


def attributes_of(key_values) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in key_values}


@dataclass(frozen=True)
class ReceivedLink:
    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[ReceivedLink, ...]
    status_code: int
    resource: dict[str, Any]
    scope: str
    transport: str

    @property
    def service(self) -> str | None:
        return self.resource.get("service.name")


@dataclass(frozen=True)
class ReceivedPoint:
    """One metric data point. ``value`` for sums and gauges; ``count``/``sum``/``min``/``max`` for histograms."""

    name: str
    unit: str
    type: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    value: float | None = None
    count: int | None = None
    sum: float | None = None
    min: float | None = None
    max: float | None = None
    is_monotonic: bool | None = None
    transport: str = ""


@dataclass(frozen=True)
class ReceivedLog:
    body: Any
    severity: str
    trace_id: str
    span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    spans: list[ReceivedSpan] = field(default_factory=list)
    points: list[ReceivedPoint] = field(default_factory=list)
    logs: list[ReceivedLog] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)


def _hex(raw: bytes) -> str:
    return raw.hex()


def _decode_traces(store: _Store, request: trace_service_pb2.ExportTraceServiceRequest, transport: str) -> None:
    decoded = []
    for resource_spans in request.resource_spans:
        resource = attributes_of(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                decoded.append(ReceivedSpan(
                    trace_id=_hex(span.trace_id), span_id=_hex(span.span_id), parent_span_id=_hex(span.parent_span_id),
                    name=span.name, kind=_SPAN_KINDS.get(span.kind, str(span.kind)),
                    start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                    attributes=attributes_of(span.attributes),
                    links=tuple(ReceivedLink(_hex(link.trace_id), _hex(link.span_id), attributes_of(link.attributes))
                                for link in span.links),
                    status_code=span.status.code, resource=resource, scope=scope_spans.scope.name,
                    transport=transport))
    with store.lock:
        store.spans.extend(decoded)
        store.requests["traces"] = store.requests.get("traces", 0) + 1


def _number(point) -> float:
    return point.as_double if point.WhichOneof("value") == "as_double" else float(point.as_int)


def _decode_metrics(store: _Store, request: metrics_service_pb2.ExportMetricsServiceRequest, transport: str) -> None:
    decoded = []
    for resource_metrics in request.resource_metrics:
        resource = attributes_of(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                which = metric.WhichOneof("data")
                common = {"name": metric.name, "unit": metric.unit, "type": which, "resource": resource,
                          "transport": transport}
                data = getattr(metric, which)
                for point in data.data_points:
                    attributes = attributes_of(point.attributes)
                    if which in ("sum", "gauge"):
                        decoded.append(ReceivedPoint(attributes=attributes, value=_number(point),
                                                     is_monotonic=getattr(data, "is_monotonic", None), **common))
                    elif which == "histogram":
                        decoded.append(ReceivedPoint(
                            attributes=attributes, count=point.count, sum=point.sum,
                            min=point.min if point.HasField("min") else None,
                            max=point.max if point.HasField("max") else None, **common))
                    else:  # exponential histograms, summaries: count and sum are enough here
                        decoded.append(ReceivedPoint(attributes=attributes, count=point.count, sum=point.sum,
                                                     **common))
    with store.lock:
        store.points.extend(decoded)
        store.requests["metrics"] = store.requests.get("metrics", 0) + 1


def _decode_logs(store: _Store, request: logs_service_pb2.ExportLogsServiceRequest, transport: str) -> None:
    decoded = []
    for resource_logs in request.resource_logs:
        resource = attributes_of(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                decoded.append(ReceivedLog(any_value(record.body), record.severity_text, _hex(record.trace_id),
                                           _hex(record.span_id), attributes_of(record.attributes), resource))
    with store.lock:
        store.logs.extend(decoded)
        store.requests["logs"] = store.requests.get("logs", 0) + 1


#: Path -> (request message class, response message class, decoder into the store).
_HTTP_ROUTES: dict[str, tuple[Any, Any, Callable[[_Store, Any, str], None]]] = {
    "/v1/traces": (trace_service_pb2.ExportTraceServiceRequest, trace_service_pb2.ExportTraceServiceResponse,
                   _decode_traces),
    "/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest, metrics_service_pb2.ExportMetricsServiceResponse,
                    _decode_metrics),
    "/v1/logs": (logs_service_pb2.ExportLogsServiceRequest, logs_service_pb2.ExportLogsServiceResponse, _decode_logs),
}


def _handler_for(store: _Store):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output quiet
            return

        def _reply(self, status: int, body: bytes = b"", content_type: str = "application/x-protobuf") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            route = _HTTP_ROUTES.get(self.path.split("?", 1)[0])
            if route is None:
                self._reply(404, b"unknown OTLP path", "text/plain")
                return
            if "protobuf" not in (self.headers.get("Content-Type") or ""):
                self._reply(415, b"only application/x-protobuf", "text/plain")
                return
            encoding = (self.headers.get("Content-Encoding") or "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            request_cls, response_cls, decode = route
            request = request_cls()
            try:
                request.ParseFromString(body)
            except Exception:  # noqa: BLE001 - a malformed body is the sender's error
                self._reply(400, b"malformed protobuf", "text/plain")
                return
            decode(store, request, "http")
            self._reply(200, response_cls().SerializeToString())

    return Handler


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OtlpReceiver:
    """OTLP over HTTP (always) and gRPC (when ``grpc=True``) into one in-memory store."""

    def __init__(self, *, grpc: bool = True):
        self._store = _Store()
        self._want_grpc = grpc
        self._http: ThreadingHTTPServer | None = None
        self._grpc = None
        self.http_port = 0
        self.grpc_port = 0

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def start(self) -> OtlpReceiver:
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self._store))
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="otlp-http", daemon=True).start()
        if self._want_grpc:
            self._start_grpc()
        return self

    def _start_grpc(self) -> None:
        import grpc
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        store = self._store

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                _decode_traces(store, request, "grpc")
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                _decode_metrics(store, request, "grpc")
                return metrics_service_pb2.ExportMetricsServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request, context):
                _decode_logs(store, request, "grpc")
                return logs_service_pb2.ExportLogsServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
        self.grpc_port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._grpc = server

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc is not None:
            self._grpc.stop(grace=None)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- what arrived ---

    def spans(self) -> list[ReceivedSpan]:
        with self._store.lock:
            return list(self._store.spans)

    def points(self, name: str | None = None) -> list[ReceivedPoint]:
        with self._store.lock:
            return [p for p in self._store.points if name is None or p.name == name]

    def logs(self) -> list[ReceivedLog]:
        with self._store.lock:
            return list(self._store.logs)

    def request_counts(self) -> dict[str, int]:
        with self._store.lock:
            return dict(self._store.requests)

    def wait_for(self, predicate: Callable[[OtlpReceiver], bool], timeout_s: float = 30.0,
                 interval_s: float = 0.1) -> bool:
        """Poll until ``predicate(self)`` holds; return whether it did within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if predicate(self):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval_s)
