"""Generate limits: the registry's fields, their defaults and refusals, and the prompt rule."""

from __future__ import annotations

import pytest

from workers.serving.generation.limits import EngineLimits, PromptTooLong, fit_prompt
from workers.serving.registry import ModelSpec, RegistryError, load_registry


def spec(**fields) -> ModelSpec:
    return ModelSpec(name="llm", kind="generate", source="dir:/models/llm", **fields)


def test_registry_limits_default_to_what_max_batch_size_and_max_seq_len_allow():
    assert spec(max_batch_size=8, max_seq_len=512).engine_limits() == EngineLimits(
        max_sequences=8, max_seq_len=512, max_prompt_tokens=511, kv_cache_tokens=8 * 512)


@pytest.mark.parametrize("fields, message", [
    ({"max_seq_len": 512, "kv_cache_tokens": 100}, "kv_cache_tokens (100) is below max_seq_len (512)"),
    ({"max_seq_len": 512, "max_prompt_tokens": 512}, "max_prompt_tokens (512) must be below max_seq_len (512)"),
])
def test_registry_refuses_limits_under_which_a_sequence_could_never_run(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec(**fields)


def test_generation_limits_on_an_embed_model_are_refused(tmp_path):
    registry = tmp_path / "registry.toml"
    registry.write_text('[models.enc]\nkind = "embed"\nsource = "dir:enc"\nkv_cache_tokens = 4096\n')
    with pytest.raises(RegistryError, match="generate models only"):
        load_registry(registry)


LIMITS = EngineLimits(max_sequences=4, max_seq_len=64, max_prompt_tokens=50, kv_cache_tokens=256)


def test_a_prompt_within_its_room_is_kept_whole():
    ids = list(range(44))
    assert fit_prompt(ids, LIMITS, max_new_tokens=20, truncate=False) is ids


@pytest.mark.parametrize("max_new_tokens, room", [(20, 44), (4, 50)])  # max_seq_len - new, or the longest prompt
def test_a_prompt_over_its_room_is_refused_with_both_numbers(max_new_tokens, room):
    with pytest.raises(PromptTooLong) as refused:
        fit_prompt(list(range(60)), LIMITS, max_new_tokens=max_new_tokens, truncate=False)
    assert refused.value.details() == {"prompt_tokens": 60, "max_prompt_tokens": room, "max_seq_len": 64,
                                       "max_new_tokens": max_new_tokens}


def test_truncate_drops_the_start_and_keeps_leading_special_tokens():
    ids = [1] + list(range(100, 160))
    assert fit_prompt(ids, LIMITS, max_new_tokens=20, truncate=True, leading_special=1) == [1] + list(range(117, 160))


def test_no_room_at_all_is_refused_even_with_truncate():
    with pytest.raises(PromptTooLong, match="at most 0 fit"):
        fit_prompt([1, 2, 3], LIMITS, max_new_tokens=64, truncate=True)
