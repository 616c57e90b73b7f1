"""What evaluation measures on a causal LM: sampled responses, their log-probs, and their diversity.

Plain functions over Hugging Face models (no Ray); ``cluster.evaluate`` runs them on held-out
prompts for the policy and the reference.
"""

from __future__ import annotations

import torch

from envs.prompting import left_pad
from policies.packing import packed_logits, sequences
from policies.sampling import scaled_logp


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n diversity: unique word n-grams / all word n-grams across the responses."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def sample(
    model, tok, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int, batch_size: int = 64
) -> list[list[int]]:
    """Sample one response (token ids, EOS kept, padding dropped) per prompt, in left-padded batches."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[i : i + batch_size], tok.pad_token_id)
        torch.manual_seed(seed + i)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_k=None,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        for row in gen[:, ids.shape[1] :].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            out.append(row)
    return out


@torch.no_grad()
def sequence_logprobs(
    model, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0, batch_size: int = 32
) -> list[float]:
    """Sum over response tokens of log pi(y_t | prefix) at the sampling temperature, one per pair.

    Batches go through the learner's packed pass (:func:`policies.packing.packed_logits`): the
    model's own head path, the LM head only where a response token is predicted, and the prompts'
    shared prefix run once. An empty response sums to 0.
    """
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        resp = responses[i : i + batch_size]
        seqs = [p + r for p, r in zip(prompts[i : i + batch_size], resp)]
        positions = [list(range(len(s) - len(r) - 1, len(s) - 1)) for s, r in zip(seqs, resp)]
        totals = torch.zeros(len(seqs), dtype=torch.float64)
        targets = torch.tensor([t for r in resp for t in r], dtype=torch.long)  # (N,)
        if len(targets):
            packing = sequences(seqs, positions)
            logits, _ = packed_logits(model, packing)  # (N, V)
            logp = scaled_logp(logits, temperature).gather(-1, targets[:, None]).squeeze(-1)  # (N,)
            totals.index_add_(0, packing.group, logp.double())
        out += totals.tolist()
    return out
