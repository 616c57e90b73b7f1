"""Packing a learner batch: one causal forward pass per episode instead of one per token.

A learner batch has one row per token: the context so far (``input_ids`` padded, ``length``)
and the token written next. Consecutive rows of an episode extend each other's context, so a
causal LM run once over the longest context of a run of rows gives the hidden state of every
row at position ``length - 1``. Grouping only needs "row j's context extends row j-1's", which
also makes it exact whoever built the batch: rows that do not extend form their own group.

The groups of an RLHF batch share a long prefix (the chat template's system turn and the
instruction: 36 of SmolLM2's ~61 prompt tokens). That prefix goes through the model once, with
gradient, and its keys/values are broadcast to every group, so each group runs only its own
suffix; the broadcast's backward sums the groups' gradients into the one prefix pass, so the
gradient is the one of separate passes. Under gradient checkpointing (a layer's forward is replayed
in the backward) the model may not write a cache, so each group then runs its whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from envs.models import decoder
from policies.kv_cache import cache_kwargs

MIN_SHARED_PREFIX = 8
"""Shorter common prefixes are run per group: a second pass costs more than it saves."""


@dataclass
class Packing:
    """How rows map into packed sequences."""

    seqs: torch.Tensor  # (G, T) token ids of each group's longest context, T = longest length
    seq_lens: torch.Tensor  # (G,)
    group: torch.Tensor  # (N,) group of each row
    pos: torch.Tensor  # (N,) position in the group's sequence whose output predicts row's next token


def pack_rows(input_ids: torch.Tensor, lengths: torch.Tensor) -> Packing:
    """Group consecutive rows whose contexts extend each other. input_ids (N, W), lengths (N,)."""
    ids, lengths = input_ids.long(), lengths.long()
    N, W = ids.shape
    col = torch.arange(W, device=ids.device)[None, :]  # (1, W)
    prev_len = lengths[:-1, None]  # (N-1, 1)
    same_prefix = ((ids[1:] == ids[:-1]) | (col >= prev_len)).all(1)  # (N-1,)
    extends = same_prefix & (lengths[1:] >= lengths[:-1])
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=ids.device), ~extends])  # (N,)
    group = starts.long().cumsum(0) - 1  # (N,)
    G = int(group[-1]) + 1 if N else 0
    last = torch.zeros(G, dtype=torch.long, device=ids.device).scatter_reduce(
        0, group, torch.arange(N, device=ids.device), reduce="amax", include_self=False
    )  # (G,) last row
    seq_lens = lengths[last]
    T = int(seq_lens.max()) if G else 0
    return Packing(ids[last, :T], seq_lens, group, lengths - 1)


def sequences(seqs: list[list[int]], positions: list[list[int]]) -> Packing:
    """The packing of whole sequences (one group each) and the positions wanted in each (evaluation)."""
    lens = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long)
    for g, s in enumerate(seqs):
        ids[g, : len(s)] = torch.tensor(s, dtype=torch.long)
    group = torch.tensor([g for g, ps in enumerate(positions) for _ in ps], dtype=torch.long)
    return Packing(ids, lens, group, torch.tensor([p for ps in positions for p in ps], dtype=torch.long))


def shared_prefix_len(packing: Packing) -> int:
    """Tokens every group's sequence starts with, up to the first position a row reads (0 for one group)."""
    seqs = packing.seqs
    if seqs.shape[0] < 2 or not len(packing.pos):
        return 0
    same = (seqs == seqs[:1]).all(0).long().cumprod(0)  # (T,) 1 while every group agrees
    return min(int(same.sum()), int(packing.pos.min()))


def checkpointing(lm) -> bool:
    """True when this forward will be checkpointed (Hugging Face then drops any cache the layers would write)."""
    return bool(getattr(lm, "is_activation_checkpointing", False)) and lm.training and torch.is_grad_enabled()


def packed_logits(lm, packing: Packing, with_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (N, V) of every row from one causal pass per group, through the model's own forward.

    The model's head path is used as is (soft-capping, logit scaling: whatever its ``forward`` does),
    with the LM head only at the rows' positions (``logits_to_keep`` as a boolean mask). A prefix
    all groups share is run once and its keys/values broadcast (see the module docstring). With
    `with_hidden`, also the final hidden state of every row (N, H), read from the base model's output.
    """
    G, T = packing.seqs.shape
    device = packing.seqs.device
    k = shared_prefix_len(packing)
    k = k if k >= MIN_SHARED_PREFIX and not checkpointing(lm) else 0
    attention = torch.arange(T, device=device)[None, :] < packing.seq_lens[:, None]  # (G, T)
    keep = torch.zeros(G, T, dtype=torch.bool, device=device)
    keep[packing.group, packing.pos] = True
    keep = keep[:, k:]  # every row reads a position >= k
    index = (keep.flatten().cumsum(0) - 1).view(G, T - k)[packing.group, packing.pos - k]  # (N,) row -> kept logit
    past = {}
    if k:
        cache = DynamicCache()
        decoder(lm)(input_ids=packing.seqs[:1, :k], use_cache=True, **cache_kwargs(decoder(lm), cache))
        shared = [(lay.keys.expand(G, -1, -1, -1), lay.values.expand(G, -1, -1, -1)) for lay in cache.layers]
        positions = torch.arange(k, T, device=device)[None, :].expand(G, -1)
        past = {"position_ids": positions, **cache_kwargs(lm, DynamicCache(ddp_cache_data=shared))}
    captured: dict[str, torch.Tensor] = {}
    hook = decoder(lm).register_forward_hook(lambda _m, _a, out: captured.update(h=out.last_hidden_state))
    try:
        out = lm(
            input_ids=packing.seqs[:, k:],
            attention_mask=attention.long(),
            logits_to_keep=keep,
            use_cache=bool(k),
            **past,
        )
    finally:
        hook.remove()
    hidden = captured["h"][packing.group, packing.pos - k] if with_hidden else None  # (N, H)
    return out.logits[index], hidden
