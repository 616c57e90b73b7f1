"""Fixtures for the serve tests: tiny model directories, free ports, a Ray Serve application."""

from __future__ import annotations

import pytest

from envs import tiny
from envs.models import export_pretrained
from envs.reward_model import RewardModel, RewardModelSettings


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """An exported tiny Llama whose vocabulary is exactly the tiny tokenizer's (so it writes words)."""
    model, tok = tiny.causal_lm(vocab_size=len(tiny.tokenizer()))
    return str(export_pretrained(model, tok, tmp_path_factory.mktemp("serve") / "tiny-policy"))


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory):
    """A saved tiny reward model (random head)."""
    return str(
        RewardModel.untrained(RewardModelSettings(backbone="tiny")).save(tmp_path_factory.mktemp("serve") / "tiny-rm")
    )


@pytest.fixture(scope="session")
def tiny_criteria_reward_dir(tmp_path_factory):
    """A saved tiny reward model with two heads (random): positivity on the response, consistency with the prompt."""
    settings = RewardModelSettings(backbone="tiny", criteria=["positivity", "consistency"])
    return str(RewardModel.untrained(settings).save(tmp_path_factory.mktemp("serve") / "tiny-rm"))
