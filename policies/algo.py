"""The one adapter from alignray's typed :class:`~cluster.config.Config` to RLlib's ``PPOConfig``.

Nothing else in the code base builds RLlib configuration. Sizes in RLlib are timesteps (one
generated token each): an iteration collects ``episodes_per_iteration * max_new_tokens``
tokens and a minibatch holds ``minibatch_episodes * max_new_tokens``. Minibatches are not
shuffled so an episode's rows stay adjacent and pack into one forward pass.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.tune.registry import register_env

from cluster.config import Config
from envs.text_env import make_text_env
from policies.callbacks import DataPositions, ResponseMetrics
from policies.learner import LMPPOLearner
from policies.lm_module import LMModule

RLLIB_ENV = "alignray-text-generation"


def env_config(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of :class:`envs.text_env.TextGenerationEnv` from the config."""
    return {
        "prompts": str(cfg.resolve_path(cfg.data.prompts)),
        "policy": _model_spec(cfg),
        "tiny_vocab_size": cfg.model.tiny_vocab_size,
        "max_prompts": cfg.data.max_prompts,
        "max_new_tokens": cfg.env.max_new_tokens,
        "max_prompt_tokens": cfg.env.max_prompt_tokens,
        "chat_template": cfg.env.chat_template,
        "instruction": cfg.env.instruction,
        "reward": dict(cfg.env.reward),
        "reward_model": str(cfg.resolve_path(cfg.reward_model.path)),
        "reward_model_backbone": cfg.reward_model.backbone,
        "reward_normalization": cfg.env.reward_normalization,
        "no_eos_penalty": cfg.env.no_eos_penalty,
        "reward_batch_size": cfg.reward_model.score_batch_size,
        "reward_model_placement": cfg.rollout.reward_model_placement,
        "seed": cfg.run.seed,
    }


def _model_spec(cfg: Config) -> str:
    """The policy spec, with a relative directory made absolute (Ray workers run elsewhere)."""
    spec = cfg.model.policy
    path = cfg.resolve_path(spec)
    return str(path.resolve()) if path.exists() else spec


def module_spec(cfg: Config) -> RLModuleSpec:
    """The RLModule spec of the LM policy."""
    return RLModuleSpec(module_class=LMModule, model_config={
        "policy": _model_spec(cfg), "dtype": cfg.model.dtype, "reference_dtype": cfg.ppo.reference_dtype,
        "tiny_vocab_size": cfg.model.tiny_vocab_size,
        "temperature": cfg.ppo.temperature, "top_k": cfg.ppo.top_k, "top_p": cfg.ppo.top_p,
    })


def build_ppo_config(cfg: Config) -> RLlibPPOConfig:
    """Map our config onto RLlib's PPOConfig (env, module, learner, scaling, fault tolerance, seed)."""
    p, r, e = cfg.ppo, cfg.rollout, cfg.env
    register_env(RLLIB_ENV, make_text_env)  # RLlib then uses make_text_env as the vector entry point
    tokens = p.episodes_per_iteration * e.max_new_tokens
    per_learner = max(tokens // max(r.num_learners, 1), 1)
    minibatch = min(p.minibatch_episodes * e.max_new_tokens, per_learner)
    return (
        RLlibPPOConfig()
        .framework("torch")
        .environment(env=RLLIB_ENV, env_config=env_config(cfg), disable_env_checking=True)
        .env_runners(
            num_env_runners=r.num_env_runners,
            num_envs_per_env_runner=r.num_envs_per_env_runner,
            gym_env_vectorize_mode="vector_entry_point",
            num_cpus_per_env_runner=r.num_cpus_per_env_runner,
            num_gpus_per_env_runner=r.num_gpus_per_env_runner,
            custom_resources_per_env_runner=dict(r.custom_resources_per_env_runner),
            batch_mode="truncate_episodes",
            rollout_fragment_length="auto",
        )
        .learners(
            num_learners=r.num_learners, num_gpus_per_learner=r.num_gpus_per_learner, learner_class=LMPPOLearner,
            custom_resources_per_learner=dict(r.custom_resources_per_learner),
            learner_config_dict={"kl_coef": p.kl_coef, "kl_target": p.kl_target, "kl_horizon": p.kl_horizon,
                                 "whiten_advantages": p.whiten_advantages, "vf_lr": p.vf_lr},
        )
        .rl_module(rl_module_spec=module_spec(cfg))
        .training(
            lr=p.lr, grad_clip=p.grad_clip, grad_clip_by="global_norm",
            train_batch_size_per_learner=per_learner, minibatch_size=minibatch, num_epochs=p.epochs,
            shuffle_batch_per_epoch=False,
            gamma=p.gamma, lambda_=p.lambda_, clip_param=p.clip_param, vf_clip_param=p.vf_clip_param,
            vf_loss_coeff=p.vf_loss_coeff, entropy_coeff=p.entropy_coeff,
            use_kl_loss=False, kl_coeff=0.0,
        )
        .callbacks([ResponseMetrics, DataPositions])
        .fault_tolerance(restart_failed_env_runners=r.restart_failed_env_runners)
        .debugging(seed=cfg.run.seed)
    )
