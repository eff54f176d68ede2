"""Risk: greedy decoding with several samples per prompt fails in the HF fallback engine
(transformers refuses ``num_return_sequences > 1`` without sampling), which breaks avg@n with
temperature 0."""

from __future__ import annotations

import pytest

from rlsys.rollout.base import SamplingParams
from tests.rollout.tiny_models import LOGPROB_TOLERANCE


def test_greedy_with_n_samples_repeats_the_greedy_response(hf_engine, prompt_ids, hf_greedy):
    samples = hf_engine.generate(prompt_ids[:3], SamplingParams(temperature=0.0, max_new_tokens=16, n=2))
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2]
    for sample in samples:
        expected = hf_greedy[sample.prompt_index]
        assert sample.response_ids == expected.response_ids and sample.finish_reason == expected.finish_reason
        # Batch composition (3 prompts here, 8 there) changes the padding, hence the last bits.
        assert sample.logprobs == pytest.approx(expected.logprobs, abs=LOGPROB_TOLERANCE)
