"""Gold criteria worked by hand: positivity is VADER's compound, consistency keeps the opening's sentiment."""

import pytest

from envs.gold import GOLD, gold_consistency, gold_criteria, gold_positivity, gold_score

# VADER compound scores (vaderSentiment 3.3): great 0.6249, awful -0.4588, "I hated this movie" -0.6369.
HATED, GREAT, AWFUL = "I hated this movie", "great", "awful"


def test_vader_values_the_hand_cases_use():
    assert [gold_score(t) for t in (GREAT, AWFUL, HATED, "the film", "")] == [0.6249, -0.4588, -0.6369, 0.0, 0.0]


def test_positivity_ignores_the_prompt():
    assert gold_positivity(HATED, GREAT) == gold_positivity("the film", GREAT) == 0.6249


def test_consistency_by_hand():
    # 1 - |-0.4588 - (-0.6369)| / 2 = 1 - 0.1781 / 2 = 0.91095
    assert gold_consistency(HATED, AWFUL) == pytest.approx(0.91095, abs=1e-9)
    # 1 - |0.6249 - (-0.6369)| / 2 = 1 - 1.2618 / 2 = 0.3691: a glowing answer to a negative opening
    assert gold_consistency(HATED, GREAT) == pytest.approx(0.3691, abs=1e-9)
    # a neutral answer to a neutral opening is perfectly consistent; an empty answer is neutral
    assert gold_consistency("the film", "the film") == 1.0
    assert gold_consistency(GREAT, "") == pytest.approx(1 - 0.6249 / 2, abs=1e-9)


def test_the_two_criteria_conflict_after_a_negative_opening():
    # After "I hated this movie" positivity prefers "great", consistency prefers "awful".
    assert gold_positivity(HATED, GREAT) > gold_positivity(HATED, AWFUL)
    assert gold_consistency(HATED, GREAT) < gold_consistency(HATED, AWFUL)


def test_registry_and_batch_scores():
    assert list(GOLD) == ["positivity", "consistency"]  # the first is what 'gold' and gold_score mean
    got = gold_criteria([HATED, HATED], [GREAT, AWFUL])
    assert got["positivity"] == [0.6249, -0.4588]
    assert got["consistency"] == pytest.approx([0.3691, 0.91095], abs=1e-9)
