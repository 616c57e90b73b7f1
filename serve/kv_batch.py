"""The running batch of a continuous-batching server: live sequences as rows of one left-padded KV cache.

Rows share one width ``T``: each is left-padded, so every row's newest token is in the last column
and one decoding step feeds one token per row. Sequences join and leave between steps:

- :meth:`RunningBatch.admit` prefills new prompts on their own (one left-padded forward), then
  left-pads the running rows' and the new rows' keys and values to a common width and stacks them,
  layer by layer (a ``DynamicCache`` layer holds ``keys``/``values`` of shape ``(B, H_kv, T, D)``).
- :meth:`RunningBatch.step` feeds one token per row and returns the next logits.
- :meth:`RunningBatch.keep` drops the other rows, then the leading columns no remaining row
  attends to, so the width shrinks back when a long sequence leaves.

Each row's positions count its own tokens (``mask.cumsum - 1``), so padding never shifts a sequence:
a sequence's logits in a changing batch equal its logits decoded alone (to float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from envs.prompting import left_pad


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` on the left of dimension ``dim`` up to ``width``."""
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    return F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [extra, 0])  # F.pad lists dimensions from the last


class RunningBatch:
    """Rows of live sequences in one KV cache; ``mask`` (B, T) marks real tokens, ``pos`` (B, 1) each row's next position."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.cache = None
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
        """Prefill new prompts and append them as the last rows -> their next-token logits (n, V)."""
        ids, mask = left_pad(prompts, self.pad_id)  # (n, Tn)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, Tn)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        pos = positions[:, -1:] + 1  # (n, 1)
        if self.cache is None:
            self.cache, self.mask, self.pos = out.cache, mask, pos
        else:
            width = max(self.width, mask.shape[1])
            for old, new in zip(self.cache.layers, out.cache.layers):
                old.keys = torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)], 0)
                old.values = torch.cat([_left_pad(old.values, width, 2), _left_pad(new.values, width, 2)], 0)
            self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)], 0)
            self.pos = torch.cat([self.pos, pos], 0)
        return out.logits[:, -1]

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
