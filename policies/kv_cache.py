"""The EnvRunner-side KV cache: one batched key/value cache whose rows are vector-env slots.

Each call gets the full padded context of every slot (the observation) and must return the
next-token logits. A row whose context is its previous context plus one token is a *hit*: only
that token goes through the model. Any other row (a new prompt after reset, an injected tool
result, a weight update) is a *miss*: its context minus the last token is prefilled in one
batched pass over the missed rows and merged into the cache. Then every row feeds its last
token in one batched decode pass. Rows are left-aligned to a common cache length; positions
that belong to no row are masked, and leading columns no row uses are dropped, so the cache
stays about ``max_prompt + max_new`` long. The keys/values of a prefix that all prompts share
(chat template, system turn, instruction) are computed once and reused by later prefills. Position ids are the token's index in its own
context, so the logits equal an uncached forward over the context.

This is deliberately *not* RLlib RNN state: RLlib would copy ``STATE_OUT`` into the episode at
every step.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from envs.models import decoder, unwrapped


def cache_kwargs(model, cache: DynamicCache) -> dict:
    """``{"cache": cache}`` on transformers versions that renamed ``past_key_values``, else the old name."""
    params = inspect.signature(unwrapped(model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


MIN_SHARED_PREFIX = 4
"""Shorter shared prefixes are not worth reusing; the next prefill then becomes the stored prefix."""


class SharedPrefix:
    """The keys and values of an earlier sequence whose leading tokens later ones may share (a chat template's system turn, an instruction).

    The sampler's cache and the server's running batch both prefill only what follows it.
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (1, H_kv, P, D)

    def match(self, seqs: list[list[int]], own: int = 0) -> int:
        """How many stored tokens every sequence starts with, each keeping at least ``own`` tokens of its own."""
        k = max(0, min(len(self.ids), min(map(len, seqs)) - own))
        for s in seqs:
            k = next((j for j in range(k) if s[j] != self.ids[j]), k)
        return k

    def layers(self, k: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``k`` columns of every layer for ``rows`` rows: (rows, H_kv, k, D) views."""
        return [
            (key[:, :, :k].expand(rows, -1, -1, -1), val[:, :, :k].expand(rows, -1, -1, -1)) for key, val in self.kv
        ]

    def cache(self, k: int, rows: int) -> DynamicCache:
        """A cache holding the first ``k`` columns for ``rows`` rows (contiguous copies; empty when ``k`` is 0)."""
        return DynamicCache(
            ddp_cache_data=[(a.contiguous(), b.contiguous()) for a, b in self.layers(k, rows)] if k else None
        )

    def update(self, seq: list[int], k: int, kv: list[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor) -> None:
        """After a prefill that reused ``k`` tokens: keep the shared part, or (k < MIN_SHARED_PREFIX) store ``seq`` instead.

        ``kv``: per layer the prefill's (keys, values) (R, H_kv, T, D), ``seq``'s in row 0 with its real columns ``valid`` (T,).
        """
        if k >= MIN_SHARED_PREFIX:
            self.ids = self.ids[:k]
            return
        real = valid.bool()
        self.ids = list(seq)
        self.kv = [(key[:1, :, real].clone(), val[:1, :, real].clone()) for key, val in kv]


class PrefixKVCache:
    """Batched per-slot KV cache keyed by token prefix. Call :meth:`clear` after a weight update."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget everything (every row misses next time)."""
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) bool: cache column holds a token of that row
        self.prev_ids: torch.Tensor | None = None  # (B, W) the contexts seen last call
        self.prev_len: torch.Tensor | None = None  # (B,)
        self.prefix = SharedPrefix()  # a prefix contexts may share, and its KV
        self.hits = self.misses = 0

    def _hit_rows(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) bool: row's context is last call's context plus exactly one token."""
        if self.prev_ids is None or self.prev_ids.shape != ids.shape or self.cache is None:
            return torch.zeros(ids.shape[0], dtype=torch.bool)
        col = torch.arange(ids.shape[1])[None, :]  # (1, W)
        same = (self.prev_ids == ids) | (col >= lengths[:, None] - 1)  # (B, W)
        return (self.prev_len == lengths - 1) & same.all(1)

    @torch.no_grad()
    def next_logits(self, lm, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, V) for contexts ``ids[b, :lengths[b]]`` (ids: (B, W) int, lengths: (B,))."""
        ids, lengths = ids.long().cpu(), lengths.long().cpu()
        device = lm.device
        hit = self._hit_rows(ids, lengths)
        self.hits += int(hit.sum())
        self.misses += int((~hit).sum())
        if self.cache is None:
            B = ids.shape[0]
            self.cache, self.mask = DynamicCache(), torch.zeros(B, 0, dtype=torch.bool)
        miss = (~hit).nonzero().squeeze(-1)
        if len(miss):
            self._prefill(lm, ids, lengths, miss)
        last = ids.gather(1, (lengths - 1)[:, None])  # (B, 1)
        mask = torch.cat([self.mask, torch.ones(len(ids), 1, dtype=torch.bool)], 1)  # (B, L + 1)
        out = lm(
            input_ids=last.to(device),
            attention_mask=mask.to(device),
            position_ids=(lengths - 1)[:, None].to(device),
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(lm, self.cache),
        )
        self.mask = mask  # the model appended the new token to self.cache in place
        self._trim()
        self.prev_ids, self.prev_len = ids.clone(), lengths.clone()
        return out.logits[:, -1].float()  # (B, V)

    def _prefill(self, lm, ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> None:
        """Run contexts-minus-last-token of `rows` through the model and put them into the cache.

        The KV of a prefix all contexts share (the chat template's system turn, the instruction)
        is kept from earlier prefills and reused, so only each context's own suffix is computed.
        """
        n = lengths[rows] - 1  # (R,) tokens to prefill per row
        L = self.mask.shape[1]
        if int(n.max()) == 0:
            self.mask[rows] = False
            return
        contexts = [ids[r, :m].tolist() for r, m in zip(rows.tolist(), n.tolist())]
        k = self.prefix.match(contexts)
        S = int((n - k).max())  # longest own suffix
        col = torch.arange(S)[None, :]
        pad = S - (n - k)[:, None]  # left padding of each suffix, between shared prefix and suffix
        valid = torch.cat([torch.ones(len(rows), k, dtype=torch.bool), col >= pad], 1)  # (R, k + S)
        src = (k + col - pad).clamp(min=0)
        x = torch.where(col >= pad, ids[rows].gather(1, src), 0)  # (R, S)
        pos = torch.where(col >= pad, k + col - pad, 0)
        past = self.prefix.cache(k, len(rows))
        if S:
            decoder(lm)(
                input_ids=x.to(lm.device),
                attention_mask=valid.to(lm.device),
                position_ids=pos.to(lm.device),
                use_cache=True,
                **cache_kwargs(decoder(lm), past),
            )
        self.prefix.update(contexts[0], k, [(lay.keys, lay.values) for lay in past.layers], valid[0])
        self._merge(past, rows, valid, L)

    def _merge(self, new: DynamicCache, rows: torch.Tensor, valid: torch.Tensor, L: int) -> None:
        """Write prefilled rows (R, H, P, D) right-aligned into the batch cache."""
        P = valid.shape[1]
        width = max(L, P)
        self._pad_left(width - L)
        keep = valid.to(new.layers[0].keys.device)[:, None, :, None]  # zero the pad slots so no NaN can leak
        if len(self.cache.layers) == 0:  # first prefill: an all-masked cache of the right shape
            B = len(self.mask)
            self.cache = DynamicCache(
                ddp_cache_data=[
                    (
                        lay.keys.new_zeros(B, lay.keys.shape[1], width, lay.keys.shape[-1]),
                        lay.values.new_zeros(B, lay.values.shape[1], width, lay.values.shape[-1]),
                    )
                    for lay in new.layers
                ]
            )
        for layer, new_layer in zip(self.cache.layers, new.layers):
            layer.keys[rows] = 0.0
            layer.values[rows] = 0.0
            layer.keys[rows, :, width - P :] = new_layer.keys * keep  # (R, H, P, D)
            layer.values[rows, :, width - P :] = new_layer.values * keep
        self.mask[rows] = False
        self.mask[rows, width - P :] = valid

    def _pad_left(self, extra: int) -> None:
        """Grow the cache by `extra` masked columns on the left."""
        if extra <= 0:
            return
        self.mask = torch.cat([torch.zeros(len(self.mask), extra, dtype=torch.bool), self.mask], 1)
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                z = layer.keys.new_zeros(*layer.keys.shape[:2], extra, layer.keys.shape[-1])
                layer.keys = torch.cat([z, layer.keys], 2)
                layer.values = torch.cat([z.clone(), layer.values], 2)

    def _trim(self) -> None:
        """Drop leading cache columns that no row uses."""
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start == 0:
            return
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
