"""A test-only resident model (registry ``impl = "tests.support.poison_model:PoisonEmbedder"``):
MiniLM, except that a batch holding the text ``POISON`` kills the process that computes it, as a
segfault in a model would. The worker-group crash tests use it to show that only the job that
crashes its worker is charged."""

from __future__ import annotations

import os

from workers.serving.models.embedder import Embedder

POISON = "this text crashes the device process"


class PoisonEmbedder(Embedder):
    """``Embedder`` that dies (exit 13, no cleanup) on a batch containing ``POISON``."""

    def __init__(self, spec, device):
        super().__init__(spec, device)
        self._poison_ids = self.encode_each([POISON])[0]

    def run_batch(self, id_lists, info=None):
        if any(list(ids) == self._poison_ids for ids in id_lists):
            os._exit(13)
        return super().run_batch(id_lists, info)
