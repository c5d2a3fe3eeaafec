"""Generation on a synthetic checkpoint: sampling, stopping, text prompts and the incremental KV cache."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Sampler, generate, load_model, score
from engine.bench.quality import top2_gap


def test_incremental_decode_equals_teacher_forced_scoring(synth_tiny):
    model = load_model(synth_tiny)
    result = generate(model, [5, 9, 14], 12, stop_at_eos=False)
    sequence = [5, 9, 14, *result.tokens]
    logits = score(model, sequence)[2:-1]
    assert top2_gap(logits).min() > 1e-3  # every step is decided far above float noise: no tie to break
    assert result.tokens == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_seed_dependent(synth_tiny):
    model = load_model(synth_tiny)
    runs = {
        seed: generate(model, [1, 2, 3], 16, Sampler(1.5, 0.95, seed), stop_at_eos=False).tokens for seed in (0, 1, 2)
    }
    assert generate(model, [1, 2, 3], 16, Sampler(1.5, 0.95, 0), stop_at_eos=False).tokens == runs[0]
    assert len({tuple(t) for t in runs.values()}) == 3


def test_tiny_top_p_keeps_only_the_most_likely_token(synth_tiny):
    model = load_model(synth_tiny)
    greedy = generate(model, [7, 8], 10, stop_at_eos=False).tokens
    assert generate(model, [7, 8], 10, Sampler(2.0, 1e-9, 3), stop_at_eos=False).tokens == greedy


def test_top_p_samples_only_inside_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    pick = Sampler(1.0, 0.75, 0).picker()  # 0.5 < 0.75 <= 0.5 + 0.3
    assert {pick(logits) for _ in range(300)} == {0, 1}


def test_generation_stops_at_eos(synth_tiny):
    model = load_model(synth_tiny)
    first = generate(model, [4, 4], 1).tokens[0]
    model.eos_token_ids = frozenset({first})
    assert generate(model, [4, 4], 10).tokens == [first]
    assert len(generate(model, [4, 4], 10, stop_at_eos=False).tokens) == 10


def test_text_prompt_goes_through_the_tokenizer(synth_tiny):
    model = load_model(synth_tiny)
    ids = model.encode("The expert cache holds hot experts.")
    assert model.decode(ids) == "The expert cache holds hot experts."
    result = generate(model, ids, 8, stop_at_eos=False)
    assert result.text == model.decode(result.tokens)
    assert result.experts_loaded > 0 and result.expert_bytes_read > 0


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_sampler_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Sampler(**kwargs)


def test_bad_prompts(synth_tiny):
    model = load_model(synth_tiny)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [10**6], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], 0)
