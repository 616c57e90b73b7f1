"""The one config adapter: our typed config -> RLlib's PPOConfig."""

from cluster.config import load_config
from policies.algo import build_ppo_config
from policies.learner import LMPPOLearner
from policies.lm_module import LMModule


def test_scaling_and_ppo_knobs_reach_rllib():
    cfg = load_config(
        "tiny",
        [
            "rollout.num_env_runners=3",
            "rollout.num_envs_per_env_runner=16",
            "rollout.num_learners=2",
            "rollout.num_gpus_per_learner=0.5",
            "rollout.num_gpus_per_env_runner=0.25",
            "rollout.num_cpus_per_env_runner=2",
            "rollout.custom_resources_per_env_runner={rollout_node: 1}",
            "rollout.restart_failed_env_runners=false",
            "run.seed=7",
            "ppo.episodes_per_iteration=32",
            "ppo.minibatch_episodes=8",
            "env.max_new_tokens=10",
        ],
    )
    c = build_ppo_config(cfg, cfg.run.seed)
    assert (c.num_env_runners, c.num_envs_per_env_runner, c.num_learners) == (3, 16, 2)
    assert (c.num_gpus_per_learner, c.num_gpus_per_env_runner, c.num_cpus_per_env_runner) == (0.5, 0.25, 2)
    assert c.custom_resources_per_env_runner == {"rollout_node": 1.0}
    assert c.restart_failed_env_runners is False and c.seed == 7
    assert c.train_batch_size_per_learner == 32 * 10 // 2 and c.minibatch_size == 8 * 10
    assert c.shuffle_batch_per_epoch is False and c.use_kl_loss is False
    assert c.gym_env_vectorize_mode == "vector_entry_point"
    assert c.learner_class is LMPPOLearner and c.rl_module_spec.module_class is LMModule
    assert c.learner_config_dict["ppo"]["kl_target"] == cfg.ppo.kl_target
