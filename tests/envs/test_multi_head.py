"""Multi-head reward model on tiny encoders: per-criterion heads, scoring, normalisation, saving, training."""

import json

import pytest
import torch
from safetensors.torch import save_file

from envs.data import write_preferences
from envs.reward_model import HEAD_FILE, META_FILE, PromptHead, RewardModel, RewardModelSettings
from envs.reward_training import _pair_scores, metrics_lines, prompt_batches, train_reward_model, train_step

TWO = RewardModelSettings(backbone="tiny", max_length=32, criteria=["positivity", "consistency"])
POS, NEG = "the film was great", "the film was terrible"
GOOD, BAD = ["great fun", "wonderful acting", "loved the story"], ["awful acting", "hated the ending", "boring music"]


def _two_head() -> RewardModel:
    torch.manual_seed(0)
    return RewardModel.untrained(TWO)


def test_heads_and_their_kinds():
    rm = _two_head()
    assert rm.criteria == ["positivity", "consistency"]
    assert isinstance(rm.heads["positivity"], torch.nn.Linear) and isinstance(rm.heads["consistency"], PromptHead)
    assert rm.head is rm.heads["positivity"]  # the first head is the default one


def test_per_criterion_scoring_and_normalisation_by_hand():
    rm = _two_head().eval()  # no dropout in the hand-made embeddings either
    texts, prompts = ["great fun", "awful acting", "the plot"], [POS, NEG, POS]
    raw = rm.score_all(texts, prompts)
    assert set(raw) == {"positivity", "consistency"}
    with torch.no_grad():
        e_r, e_p = rm.embed(texts), rm.embed(prompts)
        want_pos = (e_r @ rm.heads["positivity"].weight.T).squeeze(-1)
        want_con = rm.heads["consistency"].net(torch.cat([e_r, e_p, e_r * e_p, (e_r - e_p).abs()], -1)).squeeze(-1)
    assert raw["positivity"] == pytest.approx(want_pos.tolist(), abs=1e-5)
    assert raw["consistency"] == pytest.approx(want_con.tolist(), abs=1e-5)
    assert rm.score(texts, prompts) == pytest.approx(raw["positivity"], abs=1e-6)  # None = the first head
    assert rm.score(texts, prompts, criterion="consistency") == pytest.approx(raw["consistency"], abs=1e-6)
    rm.stats = {"positivity": (0.5, 2.0), "consistency": (-1.0, 0.25)}
    norm = rm.score_all(texts, prompts, normalize=True)
    assert norm["positivity"] == pytest.approx([(s - 0.5) / 2.0 for s in raw["positivity"]], abs=1e-5)
    assert norm["consistency"] == pytest.approx([(s + 1.0) / 0.25 for s in raw["consistency"]], abs=1e-5)
    assert rm.score_mean == 0.5 and rm.score_std == 2.0  # the first head's, where single-head callers look


def test_bad_criterion_and_missing_prompts_fail_clearly():
    rm = _two_head()
    with pytest.raises(ValueError, match=r"no head 'safety' \(heads: \['positivity', 'consistency'\]\)"):
        rm.score(["great"], criterion="safety")
    with pytest.raises(ValueError, match="'consistency' needs the prompts"):
        rm.score(["great"], criterion="consistency")
    assert len(rm.score(["great"])) == 1  # the response head needs no prompt


def test_score_all_encodes_each_text_and_each_distinct_prompt_once():
    rm = _two_head()
    seen = []
    orig = rm.encode
    rm.encode = lambda texts: seen.append(list(texts)) or orig(texts)
    rm.score_all(["great fun", "awful acting", "the plot"], [POS, POS, NEG], batch_size=8)
    assert seen == [["great fun", "awful acting", "the plot"], [POS, NEG]]


def test_save_load_round_trip(tmp_path):
    rm = _two_head()
    rm.stats = {"positivity": (0.5, 2.0), "consistency": (-1.0, 0.25)}
    rm.save(tmp_path / "rm")
    meta = json.loads((tmp_path / "rm" / META_FILE).read_text())
    assert meta["criteria"] == ["positivity", "consistency"] and meta["prompt_heads"] == ["consistency"]
    back = RewardModel.load(tmp_path / "rm")
    assert back.criteria == rm.criteria and back.stats == rm.stats and back.prompt_heads == {"consistency"}
    args = (["great fun", "the plot"], [POS, NEG])
    for c in rm.criteria:
        assert back.score(*args, criterion=c) == pytest.approx(rm.score(*args, criterion=c), abs=1e-5)


def test_an_old_single_head_directory_loads_as_overall(tmp_path):
    torch.manual_seed(0)
    rm = RewardModel.untrained(RewardModelSettings(backbone="tiny", max_length=32))
    rm.encoder.save_pretrained(tmp_path)
    rm.tokenizer.save_pretrained(tmp_path)
    weight = torch.randn(1, rm.encoder.config.hidden_size)
    save_file({"weight": weight}, str(tmp_path / HEAD_FILE))  # the format before heads had names
    old_meta = {"max_length": 32, "include_prompt": False, "pooling": "mean", "score_mean": 0.3, "score_std": 2.0}
    (tmp_path / META_FILE).write_text(json.dumps(old_meta))
    old = RewardModel.load(tmp_path)
    assert old.criteria == ["overall"] and old.stats == {"overall": (0.3, 2.0)}
    with torch.no_grad():
        want = (old.embed(["great fun"]) @ weight.T).squeeze(-1)
    assert old.score(["great fun"]) == pytest.approx(want.tolist(), abs=1e-5)
    assert old.score(["great fun"], normalize=True) == pytest.approx([(want.item() - 0.3) / 2.0], abs=1e-5)


def _row(prompt, chosen, rejected, criterion, split="train"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "criterion": criterion, "split": split}


def test_pair_scores_score_each_row_by_its_head_in_one_pass():
    rm = _two_head().eval()
    rows = [
        _row(POS, "great fun", "awful acting", "positivity"),
        _row(NEG, "awful acting", "great fun", "consistency"),
        _row(NEG, "great fun", "awful acting", "positivity"),
    ]
    seen = []
    orig = rm.encode
    rm.encode = lambda texts: seen.append(list(texts)) or orig(texts)
    with torch.no_grad():
        c, r = _pair_scores(rm, rows)
    assert seen == [["great fun", "awful acting", NEG]]  # distinct texts, then the prompts prompt heads read
    rm.encode = orig
    p = dict(zip(["great fun", "awful acting"], rm.score(["great fun", "awful acting"])))
    k = dict(
        zip(["great fun", "awful acting"], rm.score(["great fun", "awful acting"], [NEG] * 2, criterion="consistency"))
    )
    torch.testing.assert_close(c, torch.tensor([p["great fun"], k["awful acting"], p["great fun"]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        r, torch.tensor([p["awful acting"], k["great fun"], p["awful acting"]]), atol=1e-5, rtol=0
    )


def test_a_pairs_labels_of_every_criterion_share_a_batch():
    import random

    rows = []
    for i in range(6):
        rows.append(_row(POS, f"a{i}", f"b{i}", "positivity"))
    for i in range(6):
        rows.append(_row(POS, f"b{i}", f"a{i}", "consistency"))  # same pair, other order
    batches = prompt_batches(rows, 2, random.Random(0))
    assert [len(b) for b in batches] == [4, 4, 4]  # 2 compared pairs per step, each with both labels
    for b in batches:
        assert len({frozenset((rows[i]["chosen"], rows[i]["rejected"])) for i in b}) == 2


def test_multi_head_training_changes_only_the_heads_with_labels_in_the_batch():
    rm = _two_head()
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2, weight_decay=0.01)
    snap = lambda: {k: v.detach().clone() for k, v in rm.named_parameters()}  # noqa: E731
    changed = lambda a, b, prefix: [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])]  # noqa: E731

    before = snap()
    train_step(rm, opt, [_row(POS, "great fun", "awful acting", "positivity")] * 2)
    after = snap()
    assert changed(before, after, "heads.positivity") == ["heads.positivity.weight"]
    assert changed(before, after, "heads.consistency") == []
    assert changed(before, after, "encoder.")  # the shared encoder learns from every head

    train_step(rm, opt, [_row(NEG, "awful acting", "great fun", "consistency")] * 2)
    again = snap()
    assert changed(after, again, "heads.positivity") == []  # no positivity label: no gradient, no Adam step
    assert len(changed(after, again, "heads.consistency")) == 3  # both layers' weights and the hidden bias

    train_step(rm, opt, [_row(POS, "great fun", "awful acting", "positivity"), _row(NEG, "bad", "good", "consistency")])
    last = snap()
    assert changed(again, last, "heads.positivity") and changed(again, last, "heads.consistency")


def _conflicting(n_prompts: int, split: str) -> list[dict]:
    """Positivity prefers the good response; consistency the one matching the opening's mood (so not after NEG)."""
    rows = []
    for i in range(n_prompts):
        g, b = GOOD[i % 3], BAD[(i + 1) % 3]
        for prompt in (POS, NEG):
            pos = {"chosen": g, "rejected": b, "chosen_score": 0.6, "rejected_score": -0.6}
            con_good = prompt == POS
            con = {
                "chosen": g if con_good else b,
                "rejected": b if con_good else g,
                "chosen_score": 0.9,
                "rejected_score": 0.3,
            }
            rows.append({"prompt": prompt, "split": split, "criterion": "positivity", **pos})
            rows.append({"prompt": prompt, "split": split, "criterion": "consistency", **con})
    return rows


def test_training_learns_both_conflicting_criteria_and_reports_each(tmp_path):
    data = write_preferences(tmp_path / "p.parquet", _conflicting(24, "train") + _conflicting(3, "test"))
    settings = RewardModelSettings(
        backbone="tiny", max_length=32, path=str(tmp_path / "rm"), epochs=8, batch_size=4, lr=2e-3, head_width=32
    )
    m = train_reward_model(settings, data)
    assert list(m["criteria"]) == ["positivity", "consistency"]  # in order of appearance
    for c in ("positivity", "consistency"):
        assert m["criteria"][c]["train_pairs"] == 48 and m["criteria"][c]["test_pairs"] == 6
        assert m["criteria"][c]["eval_accuracy"] == 1.0, c
    assert m["eval_accuracy"] == m["criteria"]["positivity"]["eval_accuracy"]  # top level: the first head
    rm = RewardModel.load(tmp_path / "rm")
    # The heads disagree where the criteria do: after the negative opening, consistency prefers the bad answer.
    assert rm.score(["great fun"], [NEG])[0] > rm.score(["awful acting"], [NEG])[0]
    con = rm.score(["great fun", "awful acting"], [NEG, NEG], criterion="consistency")
    assert con[0] < con[1]
    lines = metrics_lines(m)
    assert [ln.split(":")[0] for ln in lines] == ["positivity", "consistency"] and "gold-order agreement" in lines[1]


def test_criteria_setting_picks_and_orders_heads_and_warm_start_adds_missing_ones(tmp_path):
    data = write_preferences(tmp_path / "p.parquet", _conflicting(6, "train") + _conflicting(1, "test"))
    base = dict(backbone="tiny", max_length=32, epochs=1, batch_size=8, lr=1e-3)
    one = train_reward_model(RewardModelSettings(**base, path=str(tmp_path / "a"), criteria=["consistency"]), data)
    assert list(one["criteria"]) == ["consistency"] and RewardModel.load(tmp_path / "a").criteria == ["consistency"]
    warm = RewardModelSettings(**base, path=str(tmp_path / "b"))
    two = train_reward_model(warm, data, warm_start=tmp_path / "a")
    assert list(two["criteria"]) == ["positivity", "consistency"]
    # The warm-started consistency head starts where the first run left it.
    assert two["criteria"]["consistency"]["untrained_accuracy"] == one["criteria"]["consistency"]["eval_accuracy"]
