"""Packing a learner batch: one causal forward pass per episode instead of one per token.

A learner batch has one row per token: the context so far (``input_ids`` padded, ``length``)
and the token written next. Consecutive rows of an episode extend each other's context, so a
causal LM run once over the longest context of a run of rows gives the hidden state of every
row at position ``length - 1``. Grouping only needs "row j's context extends row j-1's", which
also makes it exact whoever built the batch: rows that do not extend form their own group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def packed_hidden(base_model, packing: Packing) -> torch.Tensor:
    """Final hidden state of every row from one causal pass per group. Returns (N, H)."""
    mask = torch.arange(packing.seqs.shape[1], device=packing.seqs.device)[None, :] < packing.seq_lens[:, None]
    hidden = base_model(input_ids=packing.seqs, attention_mask=mask.long()).last_hidden_state  # (G, T, H)
    return hidden[packing.group, packing.pos]  # (N, H)


def per_row_hidden(base_model, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reference (slow) path: one pass per row over its own context. Returns (N, H)."""
    out = []
    for ids, n in zip(input_ids, lengths.tolist()):
        out.append(base_model(input_ids=ids[None, :n]).last_hidden_state[0, -1])
    return torch.stack(out)
