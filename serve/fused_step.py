"""One pass over the weights for a decoding step and a prefill together (Llama-architecture models).

When sequences join a running batch, the plain way is two forwards: one decoding step for the
running rows, one prefill for the new prompts. On a CPU each forward streams every weight from
memory once, so a one-prompt prefill costs about as much as two decoding steps and stalls every
running sequence. :func:`fused_step` runs both through the model's own modules in one pass: the
embeddings, projections, MLPs and LM head see the running rows' new tokens and the new prompts'
tokens packed as one ``(N, d)`` matrix, and only attention is done apart, per group:

- running rows: their one new query against their cached keys and values plus the new one,
  under their padding mask (``(B, 1, 1, W + 1)``);
- new prompts: causal attention inside each left-padded prompt (``(n, 1, L, L)``), after the keys
  and values of a prefix they all share when one is given (``(n, 1, L, K + L)``); a padding
  query attends to itself (and the shared prefix) only, so nothing is NaN (its output is never
  used or attended to).

Same maths as the model's own forward (logits equal to float rounding, checked by the tests);
quantised (int8) Linear layers work unchanged. :func:`supports_fused` says when it applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FUSED_MODEL_TYPES = {"llama"}


def supports_fused(model) -> bool:
    """Whether ``model`` has the Llama layout :func:`fused_step` runs (else use two forwards)."""
    config = getattr(model, "config", None)
    core = getattr(model, "model", None)
    return (
        getattr(config, "model_type", None) in FUSED_MODEL_TYPES
        and not getattr(config, "attention_bias", False)
        and all(hasattr(core, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
    )


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, H, T, D) with cos/sin (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _heads(t: torch.Tensor, rows: int, length: int, dim: int) -> torch.Tensor:
    """(rows * length, H * D) -> (rows, H, length, D)."""
    return t.view(rows, length, -1, dim).transpose(1, 2)


@torch.inference_mode()
def fused_step(
    model,
    layers_kv: list[tuple[torch.Tensor, torch.Tensor]],
    mask: torch.Tensor,
    pos: torch.Tensor,
    next_ids: torch.Tensor,
    new_ids: torch.Tensor,
    new_mask: torch.Tensor,
    shared: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Decode one token for B running rows and prefill n new prompts in one pass.

    ``layers_kv``: each layer's cached (keys, values) of the running rows, (B, H_kv, W, D);
    ``mask`` (B, W + 1) with the new column already appended; ``pos`` (B, 1) the new token's position;
    ``next_ids`` (B,); ``new_ids``/``new_mask`` (n, L) left-padded prompts, or their suffixes after
    ``shared``: per layer the (k, v) (n, H_kv, K, D) of the K tokens every new prompt starts with.
    -> (next-token logits (B + n, V), running rows' per-layer (k, v) (B, H_kv, 1, D) to append,
    new rows' per-layer (k, v) (n, H_kv, K + L, D)).
    """
    core, config = model.model, model.config
    b, (n, length) = next_ids.shape[0], new_ids.shape
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    groups = config.num_attention_heads // config.num_key_value_heads
    k_shared = shared[0][0].shape[2] if shared else 0
    new_pos = k_shared + (new_mask.cumsum(-1) - 1).clamp(min=0)  # (n, L)
    x = core.embed_tokens(torch.cat([next_ids, new_ids.reshape(-1)]))  # (N, d), N = B + n*L
    positions = torch.cat([pos.reshape(-1), new_pos.reshape(-1)])[None]  # (1, N)
    cos, sin = (t[0] for t in core.rotary_emb(x[None], positions))  # (N, D) each
    cos_old, sin_old = cos[:b].view(b, 1, -1), sin[:b].view(b, 1, -1)
    cos_new, sin_new = cos[b:].view(n, length, -1), sin[b:].view(n, length, -1)
    keep_old = mask.bool()[:, None, None, :]  # (B, 1, 1, W+1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    keep_new = (causal & new_mask.bool()[:, None, :]) | torch.eye(length, dtype=torch.bool)  # (n, L, L)
    keep_new = torch.cat([torch.ones(n, length, k_shared, dtype=torch.bool), keep_new], -1)[:, None]  # (n, 1, L, K+L)
    appended, prefilled = [], []
    for i, (layer, (k_cache, v_cache)) in enumerate(zip(core.layers, layers_kv)):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q_old = _rope(_heads(q[:b], b, 1, head_dim), cos_old, sin_old)  # (B, H, 1, D)
        k_old = _rope(_heads(k[:b], b, 1, head_dim), cos_old, sin_old)  # (B, H_kv, 1, D)
        v_old = _heads(v[:b], b, 1, head_dim)
        q_new = _rope(_heads(q[b:], n, length, head_dim), cos_new, sin_new)  # (n, H, L, D)
        k_new = _rope(_heads(k[b:], n, length, head_dim), cos_new, sin_new)  # (n, H_kv, L, D)
        v_new = _heads(v[b:], n, length, head_dim)
        if shared:
            k_new, v_new = torch.cat([shared[i][0], k_new], 2), torch.cat([shared[i][1], v_new], 2)  # (n, H_kv, K+L, D)
        appended.append((k_old, v_old))
        prefilled.append((k_new, v_new))
        out_old = F.scaled_dot_product_attention(
            q_old,
            torch.cat([k_cache, k_old], 2).repeat_interleave(groups, 1),
            torch.cat([v_cache, v_old], 2).repeat_interleave(groups, 1),
            attn_mask=keep_old,
            scale=attn.scaling,
        )  # (B, H, 1, D)
        out_new = F.scaled_dot_product_attention(
            q_new, k_new.repeat_interleave(groups, 1), v_new.repeat_interleave(groups, 1), keep_new, scale=attn.scaling
        )  # (n, H, L, D)
        out = torch.cat([out_old.transpose(1, 2).reshape(b, -1), out_new.transpose(1, 2).reshape(n * length, -1)])
        x = x + attn.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    last = torch.cat([x[:b], x[b:].view(n, length, -1)[:, -1]])  # (B + n, d): each row's newest token
    return model.lm_head(core.norm(last)), appended, prefilled
