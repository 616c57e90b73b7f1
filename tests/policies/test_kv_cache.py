"""The EnvRunner's prefix KV cache gives the same next-token log-probs as an uncached forward."""

import torch

from envs.models import load_causal_lm
from policies.kv_cache import PrefixKVCache
from policies.sampling import scaled_logp


def uncached_logits(lm, ids, lengths):
    """One full forward per row over its own context: (B, V)."""
    with torch.no_grad():
        return torch.stack([lm(input_ids=ids[b : b + 1, :n]).logits[0, -1] for b, n in enumerate(lengths.tolist())])


def test_prefix_cache_matches_uncached_path_through_resets_and_injections():
    lm, _ = load_causal_lm("tiny", tiny_vocab_size=64)
    g = torch.Generator().manual_seed(0)
    B, W = 3, 40
    ctx = [torch.randint(6, 60, (n,), generator=g).tolist() for n in (5, 9, 1)]
    cache = PrefixKVCache()
    for step in range(24):
        ids = torch.zeros(B, W, dtype=torch.long)
        for b, c in enumerate(ctx):
            ids[b, : len(c)] = torch.tensor(c)
        lengths = torch.tensor([len(c) for c in ctx])
        got = cache.next_logits(lm, ids, lengths)
        want = uncached_logits(lm, ids, lengths)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(scaled_logp(got, 0.7), scaled_logp(want, 0.7), atol=2e-5, rtol=1e-5)
        nxt = got.argmax(-1)
        for b in range(B):
            if len(ctx[b]) >= 14 + b:  # episode over: a new prompt of another length (cache miss)
                ctx[b] = torch.randint(6, 60, (3 + 2 * b + step % 3,), generator=g).tolist()
            elif step == 7 and b == 1:  # the env injects two tokens (a tool result): miss
                ctx[b] += [7, 8, int(nxt[b])]
            else:
                ctx[b].append(int(nxt[b]))
    assert cache.hits > cache.misses > 0
    assert cache.mask.shape[1] <= W + 2  # leading unused columns are trimmed


def test_clear_forgets_everything():
    lm, _ = load_causal_lm("tiny", tiny_vocab_size=64)
    cache = PrefixKVCache()
    ids = torch.tensor([[6, 7, 8, 0], [9, 10, 0, 0]])
    cache.next_logits(lm, ids, torch.tensor([3, 2]))
    cache.clear()
    assert cache.cache is None and cache.hits == 0
    got = cache.next_logits(lm, ids, torch.tensor([3, 2]))
    torch.testing.assert_close(got, uncached_logits(lm, ids, torch.tensor([3, 2])), atol=2e-5, rtol=1e-5)


def test_shared_prompt_prefix_is_reused_and_exact():
    lm, _ = load_causal_lm("tiny", tiny_vocab_size=64)
    g = torch.Generator().manual_seed(1)
    system = [4, 20, 21, 22, 23, 24, 25]  # the part every chat-formatted prompt starts with
    new_prompt = lambda n: system + torch.randint(6, 60, (n,), generator=g).tolist()  # noqa: E731
    B, W = 4, 40
    ctx = [new_prompt(n) for n in (3, 6, 1, 4)]
    cache = PrefixKVCache()
    computed, counting = [], [False]
    orig = lm.base_model.forward
    lm.base_model.forward = lambda *a, **k: (counting[0] and computed.append(k["input_ids"].shape[1])) or orig(*a, **k)
    for step in range(30):
        ids = torch.zeros(B, W, dtype=torch.long)
        for b, c in enumerate(ctx):
            ids[b, : len(c)] = torch.tensor(c)
        lengths = torch.tensor([len(c) for c in ctx])
        counting[0] = True
        got = cache.next_logits(lm, ids, lengths)
        counting[0] = False
        torch.testing.assert_close(got, uncached_logits(lm, ids, lengths), atol=2e-5, rtol=1e-5)
        for b in range(B):
            ctx[b] = new_prompt(1 + (step + b) % 5) if len(ctx[b]) >= 16 + b else ctx[b] + [int(got[b].argmax())]
    assert cache.prefix.ids == system
    assert computed[0] == 12 and max(computed[2:]) <= 5  # after the first prefill, only each prompt's own suffix
