"""Sampling: filters keep the right tokens; the log-prob is that of the distribution the token was drawn from."""

import math

import torch

from policies.sampling import filter_logits, sample_tokens


def test_top_k_keeps_k_best():
    out = filter_logits(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), top_k=2)
    assert torch.isinf(out[0, [0, 3]]).all() and torch.isfinite(out[0, [1, 2]]).all()


def test_top_p_keeps_the_nucleus():
    # probs 0.5, 0.3, 0.2: with top_p 0.7 the first two (mass before the third = 0.8 >= 0.7) stay
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    out = filter_logits(logits, top_p=0.7)
    assert torch.isinf(out[0, 0]) and torch.isfinite(out[0, 1:]).all()
    # top_p tiny: only the best token stays
    out = filter_logits(logits, top_p=0.01)
    assert torch.isfinite(out).sum() == 1 and torch.isfinite(out[0, 1])


def test_logp_is_under_the_distribution_sampled_from():
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(4, 1)
    tokens, logp = sample_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    # p = [0.25, 0.75]
    expected = torch.where(tokens == 1, math.log(0.75), math.log(0.25))
    torch.testing.assert_close(logp, expected.float())
    # temperature 0.5 squares the odds: p = [1/10, 9/10]
    tokens, logp = sample_tokens(logits[:1], temperature=0.5, u=torch.tensor([0.05]))
    assert tokens.tolist() == [0]
    torch.testing.assert_close(logp, torch.tensor([math.log(0.1)]))
    # top-k 1 leaves one token with probability 1: log-prob 0 (the filtered distribution, not the full one)
    tokens, logp = sample_tokens(logits, top_k=1)
    assert (tokens == 1).all() and (logp == 0).all()


def test_per_row_parameters_and_greedy_rows():
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(3, 1)
    temperature = torch.tensor([[0.0], [1.0], [0.5]])  # greedy, plain, sharper
    top_p = torch.tensor([[1.0], [0.5], [1.0]])  # the second row keeps only its best token
    tokens, logp = sample_tokens(logits, temperature, top_p=top_p, u=torch.tensor([0.9, 0.1, 0.05]))
    assert tokens.tolist() == [1, 1, 0]
    torch.testing.assert_close(logp, torch.tensor([0.0, 0.0, math.log(0.1)]))


def test_sampled_frequencies_follow_the_distribution():
    p = torch.tensor([0.1, 0.2, 0.0, 0.7])
    logits = torch.log(p).repeat(20000, 1)
    tokens, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert freq[2] == 0  # a zero-probability token is never drawn
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)  # 3+ standard errors at n = 20000
