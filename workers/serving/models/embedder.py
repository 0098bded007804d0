"""Sentence embeddings from a BERT-style encoder: mean pooling over tokens, optional L2 norm.

Matches sentence-transformers' pipeline for models such as all-MiniLM-L6-v2
(Transformer -> mean Pooling -> Normalize).

Two forward paths, chosen by device:

* **CPU (and MPS): exact and simple.** Pad the batch to its longest input, run the model in
  fp32, pool. Nothing is rounded up. On CPU the encoder and pooling are traced once at warm-up
  (TorchScript, checked against the plain forward on several shapes, dropped if they ever
  differ): the traced forward runs its ops without going back to Python between them, so it
  does not queue for the GIL behind the worker's task threads (JSON, Redis I/O), which
  otherwise stalls every op of a batch. The arithmetic is the same kernels, bit for bit.
* **CUDA: fast.** The registry's dtype (fp16/bf16), PyTorch SDPA attention, token ids staged in
  pinned host memory and copied asynchronously, and one CUDA graph per shape bucket: the
  batch is padded up to a (batch bucket, sequence bucket) pair, e.g. (8, 64), whose graph was
  captured at warm-up and is replayed with the new ids. Pooling runs inside the graph, so one
  small [batch, hidden] float32 tensor comes back to the host. Buckets: sequence lengths
  16/32/64/128/256/512 up to ``max_seq_len``; batch sizes 1, 2, 4, ... up to ``max_batch_size``.
  Padded rows and columns are masked out, so a bucketed result equals the unpadded one up to
  floating-point rounding. If capture fails (driver, library version), the worker logs why and
  serves the same padded forward eagerly.
"""

from __future__ import annotations

import base64
import logging
import time
import warnings
from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from workers.observability import telemetry
from workers.serving.models.base import compute_dtype
from workers.serving.registry import ModelSpec, resolve_source

log = logging.getLogger(__name__)

#: Sequence-length buckets for CUDA graphs (cut at the model's ``max_seq_len``, which is always one).
SEQ_BUCKETS = (16, 32, 64, 128, 256, 512)


def seq_buckets(max_seq_len: int) -> list[int]:
    """Padded sequence lengths used on CUDA: the standard buckets below ``max_seq_len``, then it."""
    return [b for b in SEQ_BUCKETS if b < max_seq_len] + [max_seq_len]


def batch_buckets(max_batch_size: int) -> list[int]:
    """Padded batch sizes used on CUDA: powers of two below ``max_batch_size``, then it."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


def bucket_for(value: int, buckets: list[int]) -> int | None:
    """The smallest bucket >= ``value``, or None if ``value`` exceeds them all."""
    index = bisect_left(buckets, value)
    return buckets[index] if index < len(buckets) else None


@dataclass
class GraphReport:
    """What CUDA-graph capture did, for logs and benchmarks."""

    enabled: bool = False
    captured: int = 0
    capture_s: float = 0.0
    replays: int = 0
    eager_batches: int = 0
    error: str | None = None
    shapes: list[tuple[int, int]] = field(default_factory=list)


class _Graph:
    """One captured forward for a fixed (batch, seq) shape: static inputs in, pooled [batch, hidden] out."""

    def __init__(self, graph: torch.cuda.CUDAGraph, ids: torch.Tensor, mask: torch.Tensor, out: torch.Tensor):
        self.graph, self.ids, self.mask, self.out = graph, ids, mask, out


class _Pooled(torch.nn.Module):
    """Encoder plus mean pooling as one module, for tracing: (ids, 0/1 mask) -> float32 [batch, hidden]."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.model = embedder.model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=ids, attention_mask=mask[:, None, None, :].bool()).last_hidden_state
        weights = mask.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class Embedder:
    """A resident encoder. ``run_batch`` is not thread-safe: only its batcher's device thread calls it.

    ``cuda_graphs`` (default: on for CUDA devices) turns graph capture off for comparisons.
    """

    kind = "embed"

    def __init__(self, spec: ModelSpec, device: str, *, cuda_graphs: bool | None = None):
        self.spec = spec
        self.device = device
        self.on_cuda = device.startswith("cuda")
        self.dtype = compute_dtype(spec, device)
        location, revision = resolve_source(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=False)
        self.model = AutoModel.from_pretrained(
            location, revision=revision, trust_remote_code=False, dtype=self.dtype, attn_implementation="sdpa",
        ).to(device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.max_seq_len = min(spec.max_seq_len, int(getattr(self.model.config, "max_position_embeddings", 1 << 30)))
        self.seq_buckets = seq_buckets(self.max_seq_len)
        self.batch_buckets = batch_buckets(spec.max_batch_size)
        self.graph_report = GraphReport()
        self._want_graphs = self.on_cuda if cuda_graphs is None else (cuda_graphs and self.on_cuda)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._mask_4d = self.on_cuda  # CUDA passes a prepared 4-D mask (no data-dependent mask logic)
        self._traced: torch.jit.ScriptModule | None = None
        self.traced_error: str | None = None
        self._host_ids: torch.Tensor | None = None
        self._host_mask: torch.Tensor | None = None
        self._device_ids: torch.Tensor | None = None
        self._device_mask: torch.Tensor | None = None

    # --- task-thread side ----------------------------------------------------------------

    def encode_each(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated at ``max_seq_len``, unpadded (cheap; runs in task threads)."""
        return self.tokenizer(texts, truncation=True, max_length=self.max_seq_len)["input_ids"]

    # --- device-thread side ---------------------------------------------------------------

    @torch.inference_mode()
    def run_batch(self, id_lists: list[list[int]], info: object = None) -> list[torch.Tensor]:
        """Forward one batch; return one float32 CPU vector (un-normalised mean pooling) per input."""
        longest = max(len(ids) for ids in id_lists)
        if not self.on_cuda:
            with telemetry.forward_span(self.spec.name, "embed", self.device, self.dtype,
                                        (len(id_lists), longest)) as span:
                pooled = self._forward_exact(id_lists)
                telemetry.record_embedding_norms(span, pooled)
            return list(pooled.unbind(0))
        rows = bucket_for(len(id_lists), self.batch_buckets)
        cols = bucket_for(longest, self.seq_buckets)
        graph = self._graphs.get((rows, cols)) if rows and cols else None
        with telemetry.forward_span(self.spec.name, "embed", self.device, self.dtype,
                                    (rows or len(id_lists), cols or self.max_seq_len)) as span:
            if graph is not None and rows and cols:  # a graph exists only for a (rows, cols) bucket
                pooled = self._replay(graph, id_lists, rows, cols)
            else:
                pooled = self._forward_padded(id_lists, rows or len(id_lists), cols or self.max_seq_len)
            telemetry.record_embedding_norms(span, pooled)
        return list(pooled.unbind(0))

    def embed(self, texts: list[str], normalize: bool = True) -> list[list[float]]:
        """Embed ``texts`` in one forward pass, bypassing any batcher; one vector per text."""
        return finish_vectors(self.run_batch(self.encode_each(texts)), normalize)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Ids and 0/1 mask [batch, seq] on the device -> pooled float32 [batch, hidden] on the device."""
        attention = mask[:, None, None, :].bool() if self._mask_4d else mask
        hidden = self.model(input_ids=ids, attention_mask=attention).last_hidden_state
        return self._pool(hidden, mask)

    def _pad_numpy(self, id_lists: list[list[int]], rows: int, cols: int,
                   ids: np.ndarray | None = None, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad into ``[rows, cols]`` int64 arrays. Padding rows (beyond the inputs) get one
        unmasked pad token so that no attention row is empty; their outputs are dropped."""
        if ids is None or mask is None:
            ids = np.empty((rows, cols), dtype=np.int64)
            mask = np.empty((rows, cols), dtype=np.int64)
        ids.fill(self.pad_id)
        mask.fill(0)
        for row, tokens in enumerate(id_lists):
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        mask[len(id_lists):, 0] = 1
        return ids, mask

    def _forward_exact(self, id_lists: list[list[int]], *, traced: bool = True) -> torch.Tensor:
        """CPU path: pad to the longest input only, forward in fp32, pool; float32 CPU [batch, hidden]."""
        ids, mask = self._pad_numpy(id_lists, len(id_lists), max(len(tokens) for tokens in id_lists))
        ids_t, mask_t = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
        if traced and self._traced is not None:
            return self._traced(ids_t, mask_t)
        return self._encode(ids_t, mask_t).float().cpu()

    def _trace(self) -> None:
        """Trace encoder + pooling (4-D mask: no data-dependent mask logic to bake in); keep it only
        if it matches the plain forward on several batch sizes and lengths."""
        probe = [[self.pad_id + 1 + (i % 50)] * n for i, n in enumerate((3, 9, 17, 2, 40))]
        longest = [[self.pad_id + 1] * self.max_seq_len]
        example_ids, example_mask = self._pad_numpy(probe[:2], 2, 16)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(_Pooled(self), (torch.from_numpy(example_ids), torch.from_numpy(example_mask)),
                                         check_trace=False)
            for batch in (probe[:1], probe[:3], probe, longest + probe[:2]):
                ids, mask = self._pad_numpy(batch, len(batch), max(map(len, batch)))
                got = traced(torch.from_numpy(ids), torch.from_numpy(mask))
                want = self._forward_exact(batch, traced=False)
                if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                    raise RuntimeError(f"traced forward differs from the plain one for a batch of {len(batch)}")
        except Exception as exc:  # noqa: BLE001 - serve the plain forward instead
            self.traced_error = f"{type(exc).__name__}: {exc}"
            log.warning("embedder %s: not tracing the CPU forward: %s", self.spec.name, self.traced_error)
            return
        self._traced = traced

    def _forward_padded(self, id_lists: list[list[int]], rows: int, cols: int) -> torch.Tensor:
        """CUDA eager path (no graph for this shape): pad to the bucket, pinned copy, forward."""
        ids, mask = self._pad_numpy(id_lists, rows, cols)
        ids_t = torch.from_numpy(ids).pin_memory().to(self.device, non_blocking=True)
        mask_t = torch.from_numpy(mask).pin_memory().to(self.device, non_blocking=True)
        self.graph_report.eager_batches += 1
        return self._encode(ids_t, mask_t)[:len(id_lists)].cpu()

    def _replay(self, graph: _Graph, id_lists: list[list[int]], rows: int, cols: int) -> torch.Tensor:
        size = rows * cols
        assert self._host_ids is not None and self._host_mask is not None, "allocated with the CUDA graphs"
        host_ids = self._host_ids[:size].view(rows, cols)
        host_mask = self._host_mask[:size].view(rows, cols)
        self._pad_numpy(id_lists, rows, cols, host_ids.numpy(), host_mask.numpy())
        graph.ids.copy_(host_ids, non_blocking=True)  # pinned -> device, ordered before the replay
        graph.mask.copy_(host_mask, non_blocking=True)
        graph.graph.replay()
        self.graph_report.replays += 1
        # .cpu() waits for the stream, so the pinned staging buffers are free again on return.
        return graph.out[:len(id_lists)].cpu()

    # --- warm-up ------------------------------------------------------------------------

    @torch.inference_mode()
    def warmup(self) -> None:
        """Run forward passes so first-job latency excludes lazy initialisation; on CUDA, capture graphs."""
        if self.on_cuda and not self._check_4d_mask():
            self._mask_4d = False
            self._want_graphs = False
            self.graph_report.error = "this transformers version does not accept a prepared 4-D mask"
            log.warning("embedder %s: %s; CUDA graphs off", self.spec.name, self.graph_report.error)
        if self.device == "cpu":
            self._trace()
        self.embed(["warm-up sentence", "a second, somewhat longer warm-up sentence"][:self.spec.max_batch_size])
        if self._want_graphs:
            self._capture_all()

    def _check_4d_mask(self) -> bool:
        """Does the model honour a prepared 4-D boolean mask exactly like its own 2-D mask handling?"""
        ids, mask = self._pad_numpy([[self.pad_id + 1] * 5, [self.pad_id + 1] * 2], 2, 8)
        ids_t, mask_t = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
        try:
            four_d = self._pool(self.model(input_ids=ids_t, attention_mask=mask_t[:, None, None, :].bool())
                                .last_hidden_state, mask_t)
        except Exception as exc:  # noqa: BLE001 - any refusal means: use the 2-D path
            log.info("embedder %s: 4-D mask refused: %s", self.spec.name, exc)
            return False
        two_d = self._pool(self.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state, mask_t)
        return bool(torch.nn.functional.cosine_similarity(four_d, two_d, dim=1).min() > 0.999)

    def _capture_all(self) -> None:
        started = time.perf_counter()
        most = self.batch_buckets[-1] * self.seq_buckets[-1]
        self._host_ids = torch.empty(most, dtype=torch.int64).pin_memory()
        self._host_mask = torch.empty(most, dtype=torch.int64).pin_memory()
        self._device_ids = torch.full((most,), self.pad_id, dtype=torch.int64, device=self.device)
        self._device_mask = torch.ones((most,), dtype=torch.int64, device=self.device)
        pool = torch.cuda.graph_pool_handle()
        try:
            # Largest first: the shared memory pool is sized by the biggest graph, the rest fit inside it.
            for rows in reversed(self.batch_buckets):
                for cols in reversed(self.seq_buckets):
                    self._graphs[(rows, cols)] = self._capture(rows, cols, pool)
        except Exception as exc:  # noqa: BLE001 - serve eagerly rather than not at all
            self._graphs.clear()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.graph_report.error = f"{type(exc).__name__}: {exc}"
            log.warning("embedder %s: CUDA graph capture failed, serving eagerly: %s", self.spec.name,
                        self.graph_report.error)
            return
        report = self.graph_report
        report.enabled, report.captured = True, len(self._graphs)
        report.capture_s = time.perf_counter() - started
        report.shapes = sorted(self._graphs)
        log.info("embedder %s: captured %d CUDA graphs (batch %s x seq %s) in %.1f s", self.spec.name,
                 report.captured, self.batch_buckets, self.seq_buckets, report.capture_s)

    def _capture(self, rows: int, cols: int, pool) -> _Graph:
        assert self._device_ids is not None and self._device_mask is not None, "allocated before capture"
        ids = self._device_ids[:rows * cols].view(rows, cols)
        mask = self._device_mask[:rows * cols].view(rows, cols)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up kernels (and SDPA's backend choice) off the capture
            for _ in range(2):
                self._encode(ids, mask)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads keep computing other models while this one is captured (a model loaded
        # into a running worker); "global" would fail their CUDA calls for the duration of the capture.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = self._encode(ids, mask)
        return _Graph(graph, ids, mask, out)


def stack_vectors(vectors: list[torch.Tensor], normalize: bool) -> torch.Tensor:
    """Stack per-text vectors into one float32 [texts, dim] tensor, L2-normalised if asked."""
    stacked = torch.stack(vectors).to(torch.float32)
    if normalize:
        stacked = torch.nn.functional.normalize(stacked, p=2, dim=1)
    return stacked


def finish_vectors(vectors: list[torch.Tensor], normalize: bool) -> list[list[float]]:
    """Stack per-text vectors, L2-normalise if asked, and return plain lists for JSON."""
    return stack_vectors(vectors, normalize).tolist()


def finish_vectors_b64(vectors: list[torch.Tensor], normalize: bool) -> list[str]:
    """As ``finish_vectors``, but each vector as base64 text of its little-endian float32 bytes
    (``EmbedRequest.encoding == "base64"``): one C-level copy and encode per row, no Python float."""
    rows = stack_vectors(vectors, normalize).cpu().contiguous().numpy().astype("<f4", copy=False)
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
