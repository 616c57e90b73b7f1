"""``alignray eval``: a policy against the reference model on held-out prompts.

For each held-out prompt both models sample a response (the training temperature, the same
seed). Each response gets the reward-model score, the gold (VADER) score, its length in tokens
and whether it ended with EOS; policy responses also get their KL to the reference, the sampled
estimate sum_t [log pi(y_t) - log pi_ref(y_t)] in nats (0 for the reference's own responses by
definition). Outputs: ``samples.parquet`` (every sample) and ``summary.json``.

Per criterion: ``rm_score.<c>`` for every reward-model head and ``gold_score.<c>`` for every gold
criterion (``envs.gold.GOLD``), in the samples and (means, and ``gold_score_sem.<c>``,
``gold_gain.<c>``) in the summary; ``rm_score`` and ``gold_score`` stay the first head and
positivity.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from cluster.config import Config
from envs.data import load_prompts, resolve_path
from envs.gold import GOLD, gold_criteria
from envs.models import load_causal_lm
from envs.prompting import prompt_ids
from envs.rewards import load_reward_model
from policies.evaluation import distinct_n, sample, sequence_logprobs
from policies.export import resolve_policy

SUMMARY_METRICS = ("rm_score", "gold_score", "kl", "length", "eos_rate", "distinct_1", "distinct_2")


def _reference_key(cfg: Config, prompt_tok: list[list[int]]) -> dict:
    """What the reference's samples depend on: the model, the tokenized prompts and the sampling settings."""
    digest = hashlib.sha256(json.dumps(prompt_tok).encode()).hexdigest()
    m = cfg.model
    return {
        "model": m.policy,
        "dtype": m.dtype,
        "prompts": digest,
        "seed": cfg.run.seed,
        "temperature": cfg.ppo.temperature,
        "max_new_tokens": cfg.env.max_new_tokens,
    }


def _reference_responses(cache: Path | None, key: dict, draw) -> list[list[int]]:
    """The reference's sampled token ids: from `cache` when it was written for `key`, else drawn (and cached)."""
    if cache and cache.exists():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return saved["responses"]
    responses = draw()
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "responses": responses}))
    return responses


def _score_side(name, tok, rm, cfg: Config, prompts, responses: list[list[int]]) -> list[dict]:
    """Score one model's sampled responses (token ids) to every prompt."""
    texts = [tok.decode(r, skip_special_tokens=True).strip() for r in responses]
    heads = rm.score_all(texts, prompts, cfg.reward_model.score_batch_size, normalize=cfg.env.reward_normalization)
    golds = gold_criteria(prompts, texts)
    first = rm.criteria[0]
    return [
        {
            "model": name,
            "prompt": pr,
            "response": t,
            "rm_score": heads[first][i],
            "gold_score": golds[next(iter(GOLD))][i],
            **{f"rm_score.{c}": v[i] for c, v in heads.items()},
            **{f"gold_score.{c}": v[i] for c, v in golds.items()},
            "kl": 0.0,
            "length": len(r),
            "eos": bool(r and r[-1] == tok.eos_token_id),
            "_ids": r,
        }
        for i, (pr, t, r) in enumerate(zip(prompts, texts, responses))
    ]


def summarize(rows: list[dict]) -> dict[str, float]:
    """Mean of each metric over one model's rows, plus distinct-n over its responses."""
    texts = [r["response"] for r in rows]
    scored = [k for k in rows[0] if k.startswith(("rm_score", "gold_score"))]
    out = {k: float(np.mean([r[k] for r in rows])) for k in [*scored, "kl", "length", "eos"]}
    out["eos_rate"] = out.pop("eos")
    out["distinct_1"], out["distinct_2"] = distinct_n(texts, 1), distinct_n(texts, 2)
    for k in (k for k in scored if k.startswith("gold_score")):
        sem = float(np.std([r[k] for r in rows]) / np.sqrt(len(rows)))
        out[k.replace("gold_score", "gold_score_sem", 1)] = sem
    return out


def evaluate(
    cfg: Config, policy: str, out_dir: str | Path | None = None, reference_cache: str | Path | None = None
) -> dict:
    """Evaluate `policy` (run dir, checkpoint, HF dir or spec) against cfg.model.policy; write outputs.

    `reference_cache` (a JSON file) keeps the reference's sampled responses between evaluations
    with the same reference, prompts and sampling settings (iterated rounds): they are drawn once
    and re-scored by each evaluation's reward model.
    """
    torch.manual_seed(cfg.run.seed)
    policy_dir, _ = resolve_policy(policy)
    out = (
        Path(out_dir)
        if out_dir
        else (Path(policy) / "eval" if Path(policy).is_dir() else Path(cfg.run.output_dir) / "eval")
    )
    m = cfg.model
    ref, tok = load_causal_lm(m.policy, m.dtype, m.tiny_vocab_size)
    pol, _ = load_causal_lm(policy_dir, m.dtype) if policy_dir != m.policy else (ref, tok)
    rm = load_reward_model(cfg.reward_model)  # tiny runs may skip training
    prompts = load_prompts(resolve_path(cfg.data.prompts), "test")[: cfg.run.eval_prompts]
    e = cfg.env
    prompt_tok = [prompt_ids(tok, p, e.instruction, e.chat_template, e.max_prompt_tokens) for p in prompts]

    def draw(model):
        return lambda: sample(model, tok, prompt_tok, e.max_new_tokens, cfg.ppo.temperature, cfg.run.seed)

    cache = Path(reference_cache) if reference_cache else None
    sides = {
        "reference": lambda: _reference_responses(cache, _reference_key(cfg, prompt_tok), draw(ref)),
        "policy": draw(pol),
    }
    rows = []
    for name, responses in tqdm(sides.items(), desc="evaluating", unit="model"):
        rows += _score_side(name, tok, rm, cfg, prompts, responses())
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
    summary = {
        "policy": policy_dir,
        "reference": m.policy,
        "prompts": len(prompts),
        "reference_metrics": summarize([r for r in rows if r["model"] == "reference"]),
        "policy_metrics": summarize(pol_rows),
    }
    for k in (k for k in summary["policy_metrics"] if k.startswith("gold_score") and "_sem" not in k):
        gain = summary["policy_metrics"][k] - summary["reference_metrics"][k]
        summary[k.replace("gold_score", "gold_gain", 1)] = gain
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["text"] = format_summary(summary) + f"\nsamples and summary written to {out}"
    summary["out_dir"] = str(out)
    return summary


def per_criterion_metrics(summary: dict) -> list[str]:
    """The summary's per-criterion metric names (``rm_score.<c>``, ``gold_score.<c>``) both sides have."""
    ref, pol = summary["reference_metrics"], summary["policy_metrics"]
    return [k for k in pol if k.startswith(("rm_score.", "gold_score.")) and k in ref]


def format_summary(summary: dict) -> str:
    """A side-by-side table of policy vs reference metrics."""
    ref, pol = summary["reference_metrics"], summary["policy_metrics"]
    lines = [f"{'metric':<24}{'reference':>12}{'policy':>12}"]
    lines += [f"{k:<24}{ref[k]:>12.3f}{pol[k]:>12.3f}" for k in [*SUMMARY_METRICS, *per_criterion_metrics(summary)]]
    return "\n".join(lines)
