"""bench/pareto_sweep.py's pure parts: the Pareto front and the runs a sweep asks for."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import pareto_sweep  # noqa: E402

from cluster.config import load_config  # noqa: E402


def test_pareto_front_keeps_only_the_undominated_points_in_order_of_the_first_coordinate():
    # (0.6, 0.5) is beaten by (0.7, 0.6); (0.2, 0.8) and (0.9, 0.1) and (0.7, 0.6) trade off; the duplicate stays
    points = [(0.9, 0.1), (0.6, 0.5), (0.7, 0.6), (0.2, 0.8), (0.7, 0.6)]
    assert pareto_sweep.pareto_front(points) == [3, 2, 4, 0]


def test_one_run_per_weight_and_the_constrained_run_and_each_is_a_valid_config():
    a = pareto_sweep.parse_args(["--tiny", "--weights", "1", "0.25", "--constrained", "0.1", "--multiplier-lr", "1"])
    assert pareto_sweep.runs_of(a) == [
        ("w1", ["env.reward={reward_model.positivity: 1, reward_model.consistency: 0}"]),
        ("w0.25", ["env.reward={reward_model.positivity: 0.25, reward_model.consistency: 0.75}"]),
        (
            "constrained0.1",
            [
                "env.reward={reward_model.positivity: 1.0}",
                "ppo.constraints={reward_model.consistency: 0.1}",
                "ppo.multiplier_lr=1",
            ],
        ),
    ]
    for _, overrides in pareto_sweep.runs_of(a):
        load_config("tiny", ["reward_model.criteria=[positivity, consistency]", *overrides])


def test_the_constrained_run_keeps_the_configs_multiplier_gains_unless_asked():
    a = pareto_sweep.parse_args(["--tiny", "--weights", "1", "--constrained", "-0.01"])
    name, overrides = pareto_sweep.runs_of(a)[-1]
    assert name == "constrained-0.01"
    assert not any(o.startswith("ppo.multiplier") for o in overrides)
