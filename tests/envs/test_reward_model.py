"""Reward model: Bradley-Terry loss by hand, training on a tiny model, save/load, batched scoring."""

import math

import pytest
import torch

from envs import tiny
from envs.data import write_preferences
from envs.models import ModelLoadError
from envs.reward_model import RewardModel, RewardModelSettings
from envs.reward_training import bradley_terry_loss, train_reward_model

TINY = RewardModelSettings(backbone="tiny", max_length=32)


def test_bradley_terry_loss_by_hand():
    # -log sigmoid(2 - 0) = log(1 + e^-2) = 0.126928; -log sigmoid(-1 - 0) = log(1 + e^1) = 1.313262
    loss = bradley_terry_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((0.126928 + 1.313262) / 2, abs=1e-6)
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def _pairs(n, split):
    good = ["great fun", "wonderful acting", "loved the story", "the best film", "really good music"]
    bad = ["terrible plot", "awful acting", "hated the ending", "the worst film", "really boring music"]
    return [
        {
            "prompt": "the film",
            "chosen": good[i % 5],
            "rejected": bad[(i * 3) % 5],
            "split": split,
            "chosen_score": 0.6,
            "rejected_score": -0.6,
        }
        for i in range(n)
    ]


def test_training_lowers_loss_and_changes_every_parameter(tmp_path):
    data = write_preferences(tmp_path / "p.parquet", _pairs(64, "train") + _pairs(16, "test"))
    settings = TINY.model_copy(update={"path": str(tmp_path / "rm"), "epochs": 6, "batch_size": 8, "lr": 1e-3})
    torch.manual_seed(0)
    before = {k: v.detach().clone() for k, v in RewardModel.untrained(TINY).named_parameters()}
    metrics = train_reward_model(settings, data)
    losses = metrics["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert metrics["eval_accuracy"] == 1.0 and metrics["eval_gold_agreement"] == 1.0
    rm = RewardModel.load(tmp_path / "rm")
    after = dict(rm.named_parameters())
    assert set(after) == set(before)
    # Token-type embeddings row 1 is never used by single-segment inputs; everything else must move.
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k])]
    assert unchanged == []
    assert (tmp_path / "rm" / "metrics.json").exists()


def test_score_batches_match_single_calls():
    rm = RewardModel.untrained(TINY)
    texts = ["great fun", "awful", "the film was really boring", "", "loved it"]
    batched = rm.score(texts, batch_size=2)
    single = [rm.score([t])[0] for t in texts]
    assert batched == pytest.approx(single, abs=1e-5)


def test_load_rejects_non_reward_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a trained reward model"):
        RewardModel.load(tmp_path)


def test_sum_pooling_is_saved_and_not_diluted_by_length(tmp_path):
    rm = RewardModel.untrained(TINY.model_copy(update={"pooling": "sum"}))
    enc = rm.encode(["great", "great great great"])
    with torch.no_grad():
        hidden = rm.encoder(**enc).last_hidden_state  # (2, T, H)
        expected = rm.head((hidden * enc["attention_mask"].unsqueeze(-1)).sum(1)).squeeze(-1)
    assert rm.score(["great", "great great great"]) == pytest.approx(expected.tolist(), abs=1e-5)
    rm.save(tmp_path / "rm")
    assert RewardModel.load(tmp_path / "rm").pooling == "sum"
    with pytest.raises(ValueError, match="pooling"):
        RewardModel(*tiny.encoder(), max_length=32, include_prompt=False, pooling="max")


def test_prompt_batches_keep_groups_together_and_cover_every_pair():
    import random

    from envs.reward_training import prompt_batches

    rows = [{"prompt": p} for p in "aaabbcaab"]  # a: 5 pairs, b: 3, c: 1
    batches = prompt_batches(rows, 4, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert [len(b) for b in batches] == [4, 4, 1]
    order = [rows[i]["prompt"] for b in batches for i in b]
    assert len([k for i, k in enumerate(order) if i == 0 or k != order[i - 1]]) == 3  # each prompt contiguous


def test_pair_scores_encode_each_distinct_text_once():
    from envs.reward_training import _pair_scores

    rm = RewardModel.untrained(TINY).eval()
    rows = [
        {"prompt": "p", "chosen": "great", "rejected": "awful"},
        {"prompt": "p", "chosen": "great", "rejected": "boring"},
        {"prompt": "p", "chosen": "boring", "rejected": "awful"},
    ]
    seen = []
    orig = rm.encode
    rm.encode = lambda texts: seen.append(list(texts)) or orig(texts)
    with torch.no_grad():
        c, r = _pair_scores(rm, rows)
    assert seen == [["great", "boring", "awful"]]
    want = dict(zip(["great", "awful", "boring"], rm.score(["great", "awful", "boring"])))
    torch.testing.assert_close(c, torch.tensor([want["great"], want["great"], want["boring"]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(r, torch.tensor([want["awful"], want["boring"], want["awful"]]), atol=1e-5, rtol=0)


def test_normalisation_stats_cover_the_distinct_responses_of_every_prompt(tmp_path):
    import numpy as np

    # Rows come grouped by prompt: 1,000 comparisons of prompt A first, then prompt B's. The stats must
    # weigh each distinct response once, B's included, not just whatever the first rows hold.
    a = [{"prompt": "A", "chosen": "great fun", "rejected": "awful acting"}] * 1000
    b = [
        {"prompt": "B", "chosen": f"a wonderful film number {i}", "rejected": f"a boring film number {i}"}
        for i in range(4)
    ]
    rows = [{**r, "split": "train", "chosen_score": 0.6, "rejected_score": -0.6} for r in a + b]
    data = write_preferences(tmp_path / "p.parquet", rows + [{**rows[-1], "split": "test"}])
    train_reward_model(TINY.model_copy(update={"path": str(tmp_path / "rm"), "epochs": 1, "batch_size": 128}), data)
    rm = RewardModel.load(tmp_path / "rm")
    distinct = sorted({r[k] for r in rows for k in ("chosen", "rejected")})  # 10 texts, fewer than NORM_SAMPLE
    scores = np.array(rm.score(distinct))
    assert rm.score_mean == pytest.approx(scores.mean(), abs=1e-5)
    assert rm.score_std == pytest.approx(scores.std(), abs=1e-5)
