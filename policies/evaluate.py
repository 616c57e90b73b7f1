"""Evaluating a policy against the reference model on held-out prompts.

For each held-out prompt both models sample a response (same sampling settings as training,
same seed). Each response gets the reward-model score, the gold (VADER) score, its length in
tokens and whether it ended with EOS; policy responses also get their KL to the reference,
the sampled estimate sum_t [log pi(y_t) - log pi_ref(y_t)] in nats (0 for the reference's own
responses by definition). Outputs: ``samples.parquet`` (every sample) and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from cluster.config import Config
from envs.data import load_prompts
from envs.gold import gold_scores
from envs.prompting import prompt_ids
from envs.rewards import load_reward_model
from policies.models import load_causal_lm

METRICS = ("rm_score", "gold_score", "kl", "length", "eos", "distinct_1", "distinct_2")


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n diversity: unique word n-grams / all word n-grams across the responses."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def sample(model, tok, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
           top_p: float, seed: int, batch_size: int = 32) -> list[list[int]]:
    """Sample one response (token ids, EOS kept, padding dropped) per prompt, in left-padded batches."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        torch.manual_seed(seed + i)
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                             top_k=top_k or None, top_p=top_p, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row in gen[:, width:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            out.append(row)
    return out


@torch.no_grad()
def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0,
                      batch_size: int = 16) -> list[float]:
    """Sum over response tokens of log pi(y_t | prefix) at the sampling temperature, one per pair.

    Right-padded batches of prompt + response (padding after the text cannot change a causal
    model's earlier positions); the LM head runs only at the positions that predict a response token.
    """
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        seqs = [p + r for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size])]
        resp = responses[i : i + batch_size]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        rows = torch.tensor([j for j, r in enumerate(resp) for _ in r], dtype=torch.long)  # (N,)
        pos = torch.tensor([len(s) - len(r) - 1 + t for s, r in zip(seqs, resp) for t in range(len(r))],
                           dtype=torch.long)  # (N,) the position whose output predicts each response token
        targets = torch.tensor([tok for r in resp for tok in r], dtype=torch.long)  # (N,)
        totals = torch.zeros(len(seqs), dtype=torch.float64)
        if len(targets):
            logits = model.get_output_embeddings()(hidden[rows, pos]).float() / temperature  # (N, V)
            logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)
            totals.index_add_(0, rows, logp.double())
        out += totals.tolist()
    return out


def resolve_policy(spec: str) -> str:
    """Map a run directory to its exported policy; HF directories and model specs pass through."""
    p = Path(spec)
    if (p / "policy" / "config.json").exists():
        return str(p / "policy")
    if p.is_dir() and not (p / "config.json").exists():
        from policies.export import checkpoint_to_hf  # RLlib checkpoint -> HF directory

        return str(checkpoint_to_hf(p, p / "hf_policy"))
    return spec


def _score_side(name, model, tok, rm, cfg: Config, prompts, prompt_tok, seed) -> list[dict]:
    """Sample and score one model's responses to every prompt."""
    pc = cfg.ppo
    responses = sample(model, tok, prompt_tok, cfg.env.max_new_tokens, pc.temperature, pc.top_k, pc.top_p, seed)
    texts = [tok.decode(r, skip_special_tokens=True).strip() for r in responses]
    rm_scores = rm.score(texts, prompts, cfg.reward_model.score_batch_size, normalize=cfg.env.reward_normalization)
    golds = gold_scores(texts)
    return [{"model": name, "prompt": pr, "response": t, "rm_score": s, "gold_score": g, "kl": 0.0,
             "length": len(r), "eos": bool(r and r[-1] == tok.eos_token_id), "_ids": r}
            for pr, t, s, g, r in zip(prompts, texts, rm_scores, golds, responses)]


def summarize(rows: list[dict]) -> dict[str, float]:
    """Mean of each metric over one model's rows, plus distinct-n over its responses."""
    texts = [r["response"] for r in rows]
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("rm_score", "gold_score", "kl", "length", "eos")}
    out["eos_rate"] = out.pop("eos")
    out["distinct_1"], out["distinct_2"] = distinct_n(texts, 1), distinct_n(texts, 2)
    out["gold_score_sem"] = float(np.std([r["gold_score"] for r in rows]) / np.sqrt(len(rows)))
    return out


def evaluate(cfg: Config, policy: str, out_dir: str | Path | None = None) -> dict:
    """Evaluate `policy` (run dir, checkpoint, HF dir or spec) against cfg.model.policy; write outputs."""
    torch.manual_seed(cfg.run.seed)
    policy_dir = resolve_policy(policy)
    out = Path(out_dir) if out_dir else (Path(policy) / "eval" if Path(policy).is_dir() else Path(cfg.run.output_dir) / "eval")
    ref, tok = load_causal_lm(cfg.model.policy, cfg.model.dtype, cfg.model.tiny_vocab_size)
    pol, _ = load_causal_lm(policy_dir, cfg.model.dtype) if policy_dir != cfg.model.policy else (ref, tok)
    rm = load_reward_model(str(cfg.reward_model.path), cfg.reward_model.backbone)  # tiny runs may skip training
    prompts = load_prompts(cfg.resolve_path(cfg.data.prompts), "test")[: cfg.run.eval_prompts]
    e = cfg.env
    prompt_tok = [prompt_ids(tok, p, e.instruction, e.chat_template, e.max_prompt_tokens) for p in prompts]
    rows = []
    for name, model in tqdm([("reference", ref), ("policy", pol)], desc="evaluating", unit="model"):
        rows += _score_side(name, model, tok, rm, cfg, prompts, prompt_tok, cfg.run.seed)
    pol_rows = [r for r in rows if r["model"] == "policy"]
    if pol is not ref:
        ids = [r["_ids"] for r in pol_rows]
        lp_pol = sequence_logprobs(pol, prompt_tok, ids, cfg.ppo.temperature)
        lp_ref = sequence_logprobs(ref, prompt_tok, ids, cfg.ppo.temperature)
        for r, a, b in zip(pol_rows, lp_pol, lp_ref):
            r["kl"] = a - b
    for r in rows:
        r.pop("_ids")
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "samples.parquet")
    summary = {"policy": policy_dir, "reference": cfg.model.policy, "prompts": len(prompts),
               "reference_metrics": summarize([r for r in rows if r["model"] == "reference"]),
               "policy_metrics": summarize(pol_rows)}
    summary["gold_gain"] = summary["policy_metrics"]["gold_score"] - summary["reference_metrics"]["gold_score"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["text"] = format_summary(summary) + f"\nsamples and summary written to {out}"
    summary["out_dir"] = str(out)
    return summary


def format_summary(summary: dict) -> str:
    """A side-by-side table of policy vs reference metrics."""
    ref, pol = summary["reference_metrics"], summary["policy_metrics"]
    lines = [f"{'metric':<14}{'reference':>12}{'policy':>12}"]
    for k in ("rm_score", "gold_score", "kl", "length", "eos_rate", "distinct_1", "distinct_2"):
        lines.append(f"{k:<14}{ref[k]:>12.3f}{pol[k]:>12.3f}")
    return "\n".join(lines)
