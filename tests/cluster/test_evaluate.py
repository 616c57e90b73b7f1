"""Evaluation on tiny models: every column, KL exactly 0 when the policy is the reference, distinct-n."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from cluster.config import load_config
from cluster.evaluate import evaluate
from cluster.report import write_report
from envs import tiny
from envs.data import write_prompts
from envs.models import export_pretrained, load_causal_lm
from policies.evaluation import distinct_n


@pytest.fixture()
def tiny_cfg(tmp_path):
    prompts = write_prompts(
        tmp_path / "prompts.parquet",
        ["the film was", "the plot is", "a movie", "the acting"],
        ["test", "test", "test", "train"],
    )
    return load_config(
        None,
        [
            "model.policy=tiny",
            "reward_model.backbone=tiny",
            f"reward_model.path={tmp_path / 'no_rm'}",
            f"data.prompts={prompts}",
            "run.eval_prompts=3",
            "env.max_new_tokens=5",
        ],
    )


def test_distinct_n_by_hand():
    # bigrams: (a b) (b a) (a b) | (a b) -> 2 distinct of 4
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert distinct_n(["a a a"], 1) == pytest.approx(1 / 3)
    assert distinct_n([""], 2) == 0.0


def test_eval_of_reference_copy_has_zero_kl_and_all_columns(tmp_path, tiny_cfg):
    model, tok = tiny.causal_lm()
    export_pretrained(model, tok, tmp_path / "policy")
    summary = evaluate(tiny_cfg, str(tmp_path / "policy"), out_dir=tmp_path / "eval")
    table = pq.read_table(tmp_path / "eval" / "samples.parquet")
    assert set(table.column_names) >= {"model", "prompt", "response", "rm_score", "gold_score", "kl", "length", "eos"}
    assert table.num_rows == 6
    assert all(abs(k) < 1e-4 for k in table.column("kl").to_pylist())
    ref, pol = summary["reference_metrics"], summary["policy_metrics"]
    # Same weights and the same seed: the policy reproduces the reference's samples exactly.
    assert pol["gold_score"] == ref["gold_score"] and pol["length"] == ref["length"]
    saved = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert saved["gold_gain"] == 0.0


def test_eval_of_changed_policy_has_positive_kl(tmp_path, tiny_cfg):
    import torch

    model, tok = tiny.causal_lm()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # sharper distribution: KL(pi || ref) > 0
    export_pretrained(model, tok, tmp_path / "policy")
    summary = evaluate(tiny_cfg, str(tmp_path / "policy"), out_dir=tmp_path / "eval")
    assert summary["policy_metrics"]["kl"] > 0.0


def test_report_from_metrics_and_eval(tmp_path, tiny_cfg):
    run = tmp_path / "run"
    model, tok = tiny.causal_lm()
    export_pretrained(model, tok, run / "policy")
    (run / "metrics.csv").write_text(
        "iteration,rm_score,gold_score,kl_ref,kl_coef\n1,0.1,0.0,0.5,0.05\n2,0.3,0.2,1.5,0.06\n"
    )
    evaluate(tiny_cfg, str(run), out_dir=run / "eval")
    report = write_report(run)
    text = report.read_text()
    for name in ("rm_score", "gold_score", "kl_ref", "kl_coef", "gold_vs_kl"):
        png = run / "report" / f"{name}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
        assert f"report/{name}.png" in text
    assert "| prompt | reference (gold) | policy (gold, KL) |" in text


@pytest.mark.parametrize("system", [[], list(range(30, 40))])  # no shared prefix; a 10-token one run once
def test_batched_sequence_logprobs_match_one_pass_per_response(system):
    from policies.evaluation import sequence_logprobs

    lm, _ = load_causal_lm("tiny", tiny_vocab_size=64)
    prompts, responses = [[5, 6, 7], [8], [9, 10], [11, 12]], [[20, 21], [22, 23, 24, 25], [], [3]]
    prompts = [system + p for p in prompts]
    want = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            if not r:
                want.append(0.0)
                continue
            logits = lm(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / 0.7
            want.append(float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).sum()))
    got = sequence_logprobs(lm, prompts, responses, temperature=0.7, batch_size=3)  # batches of 3 and 1
    assert got == pytest.approx(want, abs=1e-4)
    assert got[2] == 0.0


def test_reference_samples_are_drawn_once_per_key(tmp_path, tiny_cfg, monkeypatch):
    import cluster.evaluate as ev

    model, tok = tiny.causal_lm()
    export_pretrained(model, tok, tmp_path / "policy")
    calls = []
    real = ev.sample
    monkeypatch.setattr(ev, "sample", lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    cache = tmp_path / "ref.json"
    first = evaluate(tiny_cfg, str(tmp_path / "policy"), out_dir=tmp_path / "e1", reference_cache=cache)
    assert len(calls) == 2 and cache.exists()  # reference and policy sampled; the reference's kept
    second = evaluate(tiny_cfg, str(tmp_path / "policy"), out_dir=tmp_path / "e2", reference_cache=cache)
    assert len(calls) == 3  # only the policy sampled again
    assert second["reference_metrics"] == first["reference_metrics"]
    ref_rows = [pq.read_table(tmp_path / d / "samples.parquet").to_pylist()[:3] for d in ("e1", "e2")]
    assert ref_rows[0] == ref_rows[1]
    other_seed = tiny_cfg.model_copy(update={"run": tiny_cfg.run.model_copy(update={"seed": 7})})
    evaluate(other_seed, str(tmp_path / "policy"), out_dir=tmp_path / "e3", reference_cache=cache)
    assert len(calls) == 5  # another sampling seed: the cache does not apply, both sides sampled
