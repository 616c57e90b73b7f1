"""The running batch of a continuous-batching server: live sequences as rows of one left-padded KV cache.

Rows share one width ``T``: each is left-padded, so every row's newest token is in the last column
and one decoding step feeds one token per row. Sequences join and leave between steps:

- :meth:`RunningBatch.admit` prefills new prompts on their own (one left-padded forward), then
  left-pads the running rows' and the new rows' keys and values to a common width and stacks them,
  layer by layer (a ``DynamicCache`` layer holds ``keys``/``values`` of shape ``(B, H_kv, T, D)``).
- :meth:`RunningBatch.step` feeds one token per row and returns the next logits;
  :meth:`RunningBatch.step_and_admit` does both in one pass over the weights when the model has
  the Llama layout (:mod:`serve.fused_step`), else as two forwards.
- :meth:`RunningBatch.keep` drops the other rows, then the leading columns no remaining row
  attends to, so the width shrinks back when a long sequence leaves.
- Prompts that start like an earlier prompt (a chat template's system turn, a shared instruction:
  36 of the demo's 61 prompt tokens) reuse that prompt's keys and values
  (:class:`policies.kv_cache.SharedPrefix`, the sampler's mechanism)
  and prefill only their own suffix; such a row holds the shared columns, then the suffix's left
  padding, then the suffix.

Each row's positions count its own tokens (kept in ``pos``, never derived from the column), so
padding never shifts a sequence: a sequence's logits in a changing batch equal its logits decoded
alone (to float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from envs.prompting import left_pad
from policies.kv_cache import SharedPrefix, cache_kwargs
from serve.fused_step import fused_step, supports_fused


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` on the left of dimension ``dim`` up to ``width``."""
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    return F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [extra, 0])  # F.pad lists dimensions from the last


class RunningBatch:
    """Rows of live sequences in one KV cache; ``mask`` (B, T) marks real tokens, ``pos`` (B, 1) each row's next position."""

    def __init__(self, model, pad_id: int, fuse: bool | None = None, share_prefix: bool = True):
        self.model, self.pad_id, self.share_prefix = model, pad_id, share_prefix
        self.fuse = supports_fused(model) if fuse is None else fuse
        self.cache = None
        self.prefix = SharedPrefix()
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # (B, T)
        self.pos = torch.zeros((0, 1), dtype=torch.long)  # (B, 1)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @torch.inference_mode()
    def admit(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill new prompts (after the prefix they share with an earlier one) as the last rows -> their next-token logits (n, V)."""
        k, ids, mask, full = self._suffixes(prompts)
        positions = k + (mask.cumsum(-1) - 1).clamp(min=0)  # (n, S)
        past = cache_kwargs(self.model, self.prefix.cache(k, len(prompts))) if k else {}
        out = self.model(
            input_ids=ids, attention_mask=full, position_ids=positions, use_cache=True, logits_to_keep=1, **past
        )
        new_kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        self._remember(prompts, k, new_kv, full)
        pos = positions[:, -1:] + 1  # (n, 1)
        if self.cache is None:
            self.cache, self.mask, self.pos = out.cache, full, pos
        else:
            self._stack(new_kv, full, pos)
        return out.logits[:, -1]

    def _suffixes(self, prompts: list[list[int]]) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(shared prefix length k, left-padded suffixes after it (n, S), their mask (n, S), the rows' mask (n, k + S))."""
        k = self.prefix.match(prompts, own=1) if self.share_prefix else 0
        ids, mask = left_pad([p[k:] for p in prompts], self.pad_id)
        return k, ids, mask, torch.cat([torch.ones((len(prompts), k), dtype=mask.dtype), mask], 1)

    def _remember(self, prompts: list[list[int]], k: int, kv, full: torch.Tensor) -> None:
        """Keep the shared prefix, or store the first new prompt as the one later prompts may share."""
        if self.share_prefix:
            self.prefix.update(prompts[0], k, kv, full[0])

    def _stack(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, pos: torch.Tensor) -> None:
        """Append rows (their per-layer keys/values, mask and next positions) below the running ones."""
        width = max(self.width, mask.shape[1])
        for layer, (keys, values) in zip(self.cache.layers, new_kv):
            layer.keys = torch.cat([_left_pad(layer.keys, width, 2), _left_pad(keys, width, 2)], 0)
            layer.values = torch.cat([_left_pad(layer.values, width, 2), _left_pad(values, width, 2)], 0)
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)], 0)
        self.pos = torch.cat([self.pos, pos], 0)

    @torch.inference_mode()
    def step_and_admit(self, next_ids: torch.Tensor, prompts: list[list[int]]) -> torch.Tensor:
        """:meth:`step` for the running rows and :meth:`admit` for new prompts -> logits (B + n, V), in one pass if it can."""
        if not self.fuse or self.cache is None:
            return torch.cat([self.step(next_ids), self.admit(prompts)])
        k, ids, mask, full = self._suffixes(prompts)
        self.mask = torch.cat([self.mask, torch.ones((self.rows, 1), dtype=self.mask.dtype)], 1)  # (B, W+1)
        kv = [(layer.keys, layer.values) for layer in self.cache.layers]
        shared = self.prefix.layers(k, len(prompts)) if k else None
        logits, appended, prefilled = fused_step(self.model, kv, self.mask, self.pos, next_ids, ids, mask, shared)
        for layer, (keys, values) in zip(self.cache.layers, appended):
            layer.keys, layer.values = torch.cat([layer.keys, keys], 2), torch.cat([layer.values, values], 2)
        self.pos = self.pos + 1
        self._remember(prompts, k, prefilled, full)
        self._stack(prefilled, full, k + mask.sum(-1, keepdim=True))
        return logits

    @torch.inference_mode()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) -> the next logits (B, V)."""
        self.mask = torch.cat([self.mask, torch.ones((self.rows, 1), dtype=self.mask.dtype)], 1)  # (B, T+1)
        out = self.model(
            input_ids=next_ids[:, None],
            attention_mask=self.mask,
            position_ids=self.pos,
            cache=self.cache,
            use_cache=True,
        )
        self.cache, self.pos = out.cache, self.pos + 1
        return out.logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then trim the leading columns none of them uses."""
        if not rows:
            self.cache, self.mask, self.pos = None, self.mask[:0, :0], self.pos[:0]
            return
        if rows == list(range(self.rows)):
            return
        idx = torch.tensor(rows, dtype=torch.long)
        self.cache.batch_select_indices(idx)
        self.mask, self.pos = self.mask[idx], self.pos[idx]
        start = int(self.mask.any(0).long().argmax())  # the first column some row still attends to
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]
