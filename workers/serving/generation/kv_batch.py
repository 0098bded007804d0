"""The KV cache of the running batch: a transformers ``DynamicCache`` whose rows are the
sequences, left-padded so that every row's newest position is the last column.

Rows join (``extend``: the narrower side is padded on the left) and leave (``keep``: the rows
are selected, then columns that are padding in every remaining row are dropped) between
decoding steps, so the cache always holds ``rows x longest row`` positions and follows the
real lengths. The attention mask marks real positions with 1.

Reads and writes the per-layer ``keys``/``values`` tensors of ``DynamicCache.layers``
(transformers >= 4.56, the same in 5.17 and 5.25): transformers has no public call that pads
a cache or drops leading columns. Only full-attention layers (``DynamicLayer``) are supported;
``check_supported`` refuses a model with others (sliding windows, linear attention).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def new_cache(config) -> DynamicCache:
    """An empty cache for a model with ``config``."""
    return DynamicCache(config=config)


def check_supported(config) -> None:
    """Raise ``ValueError`` unless every cache layer of this model is a plain full-attention layer."""
    kinds = {type(layer).__name__ for layer in new_cache(config).layers}
    if kinds - {DynamicLayer.__name__}:
        raise ValueError(f"continuous batching supports full-attention decoder models only; this model's cache "
                         f"has {', '.join(sorted(kinds))} layers")


class PaddedKV:
    """The running batch's cache and attention mask (``[rows, width]``, 1 = real position)."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask
        # Padding positions of a prefill hold whatever the model computed for pad tokens: zero them,
        # so a masked position can never carry a NaN into a later step's attention (0 x NaN = NaN).
        padding = (mask == 0)[:, None, :, None]
        if padding.any():
            for layer in cache.layers:
                layer.keys = layer.keys.masked_fill(padding, 0)
                layer.values = layer.values.masked_fill(padding, 0)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def positions(self) -> int:
        """Token positions the cache holds (``rows x width``): what the KV budget counts."""
        return self.rows * self.width

    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers if layer.is_initialized)

    def next_step_mask(self) -> torch.Tensor:
        """Extend the mask by one real position per row (the token the next step feeds) and return it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask

    def extend(self, other: PaddedKV) -> None:
        """Append ``other``'s rows after this batch's rows."""
        width = max(self.width, other.width)
        for layer, joining in zip(self.cache.layers, other.cache.layers):
            layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(joining.keys, width)])
            layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(joining.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); drop the columns that are then padding in every row."""
        index = torch.tensor(rows, device=self.mask.device, dtype=torch.long)
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.width
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence axis (the last of a mask, the third of a ``[rows, heads, seq, dim]`` cache
    tensor) with zeros on the left up to ``width``."""
    missing = width - (tensor.shape[-1] if tensor.dim() == 2 else tensor.shape[-2])
    if missing == 0:
        return tensor
    pad = (missing, 0) if tensor.dim() == 2 else (0, 0, missing, 0)
    return torch.nn.functional.pad(tensor, pad)
