"""The packed learner forward (one causal pass per episode) equals a per-token forward."""

import torch
from ray.rllib.core.columns import Columns

from policies.lm_module import ENTROPY, LOGP
from policies.packing import pack_rows, packed_logits
from tests.fixtures.modules import tiny_module

W = 12


def rows(contexts):
    ids = torch.zeros(len(contexts), W, dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, : len(c)] = torch.tensor(c)
    return ids, torch.tensor([len(c) for c in contexts])


def episode_rows():
    """Two episodes' rows as a learner batch holds them (each ends with its bootstrap row)."""
    a = [6, 7, 8]
    b = [9, 10]
    ctx = [a, a + [11], a + [11, 12], a + [11, 12, 3], b, b + [13], b + [13, 3]]
    actions = [11, 12, 3, 3, 13, 3, 3]
    return ctx, torch.tensor(actions)


def module(inference_only=False):
    return tiny_module(W, inference_only, temperature=0.8)


def test_pack_rows_groups_episodes():
    ids, lengths = rows(episode_rows()[0])
    p = pack_rows(ids, lengths)
    assert p.group.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert p.seq_lens.tolist() == [6, 4] and p.seqs.shape == (2, 6)
    assert p.pos.tolist() == [2, 3, 4, 5, 1, 2, 3]
    shuffled = pack_rows(ids[[3, 0, 5]], lengths[[3, 0, 5]])  # rows out of order: one group each, still exact
    assert shuffled.group.tolist() == [0, 1, 2]


def test_packed_logits_and_hidden_equal_a_forward_per_row():
    m = module()
    ctx, _ = episode_rows()
    ids, lengths = rows(ctx)
    with torch.no_grad():
        logits, hidden = packed_logits(m.lm, pack_rows(ids, lengths), with_hidden=True)
        want_logits = torch.stack([m.lm(input_ids=torch.tensor([c])).logits[0, -1] for c in ctx])
        want_hidden = torch.stack([m.lm.base_model(input_ids=torch.tensor([c])).last_hidden_state[0, -1] for c in ctx])
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=1e-5)


def test_forward_train_logp_matches_per_token_reference():
    m = module()
    ctx, actions = episode_rows()
    ids, lengths = rows(ctx)
    out = m.forward_train({Columns.OBS: {"input_ids": ids, "length": lengths}, Columns.ACTIONS: actions})
    with torch.no_grad():
        ref = []
        for c, a in zip(ctx, actions.tolist()):
            logits = m.lm(input_ids=torch.tensor([c])).logits[0, -1] / 0.8
            ref.append(torch.log_softmax(logits, -1)[a])
    torch.testing.assert_close(out[LOGP].detach(), torch.stack(ref), atol=1e-5, rtol=1e-5)
    assert out[ENTROPY].shape == (7,) and Columns.EMBEDDINGS not in out  # the reference critic needs no policy features
    batch = {Columns.OBS: {"input_ids": ids, "length": lengths}, Columns.ACTIONS: actions}
    assert tiny_module(W, critic="policy").forward_train(batch)[Columns.EMBEDDINGS].shape == (7, 32)
    out[LOGP].sum().backward()  # gradients flow through the packed pass
    assert m.lm.model.embed_tokens.weight.grad is not None


def shared_prefix_rows():
    """Three episodes whose prompts share a 10-token prefix (a chat template's system turn), of different lengths."""
    system = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    prompts = [system + [20], system + [21, 22], system + [23]]
    responses = [[30, 31, 3], [32], [33, 34]]
    ctx = [p + r[:t] for p, r in zip(prompts, responses) for t in range(len(r))]
    return ctx, torch.tensor([r[t] for r in responses for t in range(len(r))])


def test_shared_prefix_pass_equals_separate_passes_in_logits_and_gradient(monkeypatch):
    import policies.packing as packing

    m = module()
    ctx, actions = shared_prefix_rows()
    width = max(map(len, ctx))
    ids = torch.zeros(len(ctx), width, dtype=torch.long)
    for i, c in enumerate(ctx):
        ids[i, : len(c)] = torch.tensor(c)
    p = pack_rows(ids, torch.tensor([len(c) for c in ctx]))
    assert p.seqs.shape[0] == 3 and packing.shared_prefix_len(p) == 10

    def run():
        m.lm.zero_grad()
        logits, hidden = packed_logits(m.lm, p, with_hidden=True)
        torch.log_softmax(logits, -1).gather(-1, actions[:, None]).sum().backward()
        return logits.detach(), hidden.detach(), m.lm.model.embed_tokens.weight.grad.clone()

    shared = run()
    monkeypatch.setattr(packing, "MIN_SHARED_PREFIX", 10**6)  # the same batch without the shared prefix
    separate = run()
    with torch.no_grad():
        want = torch.stack([m.lm(input_ids=torch.tensor([c])).logits[0, -1] for c in ctx])
    torch.testing.assert_close(shared[0], want, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert shared[2][5:15].abs().sum() > 0  # the prefix tokens' embeddings got gradient from every group


def test_no_shared_prefix_past_the_first_read_position():
    from policies.packing import shared_prefix_len

    a, b = [5, 6, 7, 8, 9, 10, 11, 30], [5, 6, 7, 8, 9, 10, 11, 31]  # two groups agree on 7 tokens
    ids, lengths = rows([a[:4], a, b])
    assert shared_prefix_len(pack_rows(ids, lengths)) == 3  # but row 0 reads position 3: its output must be computed
    ids, lengths = rows([[5, 6, 7, 8, 9, 10, 11]])
    assert shared_prefix_len(pack_rows(ids, lengths)) == 0  # one group: nothing to share


def test_gradient_checkpointing_keeps_log_probs_and_adapter_gradients():
    """model.gradient_checkpointing on a LoRA learner: same log-probs and adapter gradients, shared prefix run per group."""
    from envs.models import LoraSettings, ModelSettings
    from policies.packing import checkpointing
    from tests.fixtures.modules import VOCAB

    ctx, actions = shared_prefix_rows()
    width = max(map(len, ctx))
    ids = torch.zeros(len(ctx), width, dtype=torch.long)
    for i, c in enumerate(ctx):
        ids[i, : len(c)] = torch.tensor(c)
    batch = {Columns.OBS: {"input_ids": ids, "length": torch.tensor([len(c) for c in ctx])}, Columns.ACTIONS: actions}

    def grads(on: bool):
        torch.manual_seed(0)  # the same adapter initialisation for both modules
        model = ModelSettings(
            policy="tiny", tiny_vocab_size=VOCAB, lora=LoraSettings(rank=4), gradient_checkpointing=on
        )
        m = tiny_module(width, model=model, critic="none")
        logp = m.forward_train(batch)[LOGP]
        assert checkpointing(m.lm) is on  # forward_train put the module in training mode
        logp.sum().backward()
        named = {n: p.grad for n, p in m.lm.named_parameters() if p.requires_grad}
        assert all("lora_" in n for n in named) and all(g is not None for g in named.values())
        return logp.detach(), named

    plain_logp, plain = grads(False)
    ckpt_logp, ckpt = grads(True)
    torch.testing.assert_close(ckpt_logp, plain_logp, atol=1e-5, rtol=1e-5)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-5, rtol=1e-4)
    assert sum(g.abs().sum() for g in ckpt.values()) > 0
