"""Sampling picks what each rule allows and nothing else."""

import numpy as np
import pytest

from owl2_edge.sampling import Sampler, SamplingParams

LOGITS = np.array([0.0, 3.0, 2.5, 1.0, -1.0], dtype=np.float32)


def draws(params: SamplingParams, n=400, previous=()):
    s = Sampler(params)
    return {s(LOGITS, list(previous)) for _ in range(n)}


def test_temperature_zero_is_argmax():
    assert draws(SamplingParams(temperature=0), n=5) == {1}


def test_top_k_keeps_only_the_k_best():
    assert draws(SamplingParams(temperature=5.0, top_k=2)) == {1, 2}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # softmax(LOGITS): token 1 alone holds ~0.52; 1 and 2 together ~0.84.
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.5)) == {1}
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.8)) == {1, 2}


def test_min_p_drops_tokens_far_below_the_best():
    assert draws(SamplingParams(temperature=1.0, top_k=0, min_p=0.5)) == {1, 2}


def test_repeat_penalty_can_turn_greedy_away_from_a_repeated_token():
    assert draws(SamplingParams(temperature=0, repeat_penalty=2.0), n=3, previous=[1]) == {2}


def test_same_seed_same_draws():
    a = Sampler(SamplingParams(temperature=1.0, seed=7))
    b = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert [a(LOGITS, []) for _ in range(20)] == [b(LOGITS, []) for _ in range(20)]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(min_p=1.0), dict(max_tokens=0)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
