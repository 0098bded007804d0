"""The generation engine on CUDA in bf16: how many greedy texts stay the same batched as alone.

In bf16 the arithmetic of a row depends on what shares its batch (kernel choice, reduction
order), so greedy texts may part ways after a near-tie; the issue asks for the count, not for
equality. The test reports it (``record_property`` and stdout) and asserts what must hold: every
sequence completes with its own length, and the sequences really shared decoding steps.
Skipped without CUDA. Needs only torch and transformers, so on the GPU machine:
``python3 -m pytest --noconftest -m gpu tests/unit/test_generation_gpu.py -s``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

JOBS = 16


@pytest.fixture(scope="module")
def engine():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bench.generation import LLAMA_1B, word_tokenizer
    from workers.serving.generation.engine import GenerationEngine
    from workers.serving.generation.hooks import EngineHooks
    from workers.serving.generation.limits import EngineLimits

    class Steps(EngineHooks):
        widest = 0

        def on_step(self, model, step):
            Steps.widest = max(Steps.widest, step.sequences)

    torch.manual_seed(0)
    config = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": 4})  # the 1B shape, fewer layers: quick
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    limits = EngineLimits(max_sequences=JOBS, max_seq_len=512, max_prompt_tokens=256, kv_cache_tokens=JOBS * 512)
    generation = GenerationEngine(model, word_tokenizer(config.vocab_size), limits, name="llama-bf16",
                                  hooks=Steps(), eos_token_ids=())
    generation.warmup()
    yield generation, Steps
    generation.close()


def test_report_how_many_greedy_bf16_texts_match_alone_and_batched(engine, record_property):
    from bench.generation import make_prompts
    from workers.serving.generation.sampling import Sampling

    generation, steps = engine
    prompts = make_prompts(generation.tokenizer, JOBS, seed=3)
    lengths = [16 + (i * 13) % 112 for i in range(JOBS)]
    alone = [generation.submit(f"alone-{i}", prompt, Sampling(max_new_tokens=n)).wait(300)
             for i, (prompt, n) in enumerate(zip(prompts, lengths))]
    steps.widest = 0
    handles = [generation.submit(f"batched-{i}", prompt, Sampling(max_new_tokens=n))
               for i, (prompt, n) in enumerate(zip(prompts, lengths))]
    batched = [handle.wait(300) for handle in handles]
    matching = sum(a.text == b.text for a, b in zip(alone, batched))
    same_first_token = sum(a.text.split(" ")[:1] == b.text.split(" ")[:1] for a, b in zip(alone, batched))
    record_property("bf16_greedy_texts_matching", f"{matching}/{JOBS}")
    print(f"\nbf16 greedy, {JOBS} sequences: {matching}/{JOBS} texts equal batched and alone "
          f"({same_first_token}/{JOBS} agree on the first token); widest step {steps.widest} sequences")
    assert [o.tokens_generated for o in batched] == lengths == [o.tokens_generated for o in alone]
    assert steps.widest > JOBS // 2
