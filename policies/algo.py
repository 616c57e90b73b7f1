"""The one adapter from alignray's settings to RLlib's ``PPOConfig``, and the ``rollout`` section it owns.

Nothing else in the code base builds RLlib configuration. It reads the sections of any
:class:`TrainingSections` (the application config is one) and plugs in alignray's extension
points: :class:`~policies.algorithm.ResponsePPO` (iterations of exactly N whole responses),
:class:`~policies.env_runner.ResponseEnvRunner` (each runner its share of the prompts, whole
responses only), :class:`~policies.learner.LMPPOLearner` and :class:`~policies.lm_module.LMModule`.
RLlib's timestep-based batch sizes are set consistently but do not decide anything: the
Learner cuts minibatches by response.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from pydantic import Field, NonNegativeFloat
from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.tune.registry import register_env

from envs.data import DataSettings, resolve_path
from envs.models import ModelSettings
from envs.reward_model import RewardModelSettings
from envs.settings import Settings
from envs.text_env import EnvSettings
from envs.text_vector_env import make_text_env
from policies.algorithm import ResponsePPO
from policies.callbacks import DataPositions, ResponseMetrics
from policies.env_runner import ResponseEnvRunner
from policies.learner import LMPPOLearner, PPOSettings
from policies.lm_module import LMModule, ModuleSettings

RLLIB_ENV = "alignray-text-generation"


class RolloutSettings(Settings):
    """The ``rollout`` section: how many EnvRunners and Learners, and where they run."""

    num_env_runners: int = Field(0, ge=0)
    """Remote EnvRunner actors (0 = sample in the driver process)."""
    num_envs_per_env_runner: int = Field(8, ge=1)
    """Vectorised sub-environments (sequences generated together) per EnvRunner."""
    num_learners: int = Field(0, ge=0)
    """Remote Learner actors (0 = learn in the driver; 2+ uses torch DDP)."""
    num_gpus_per_learner: float = Field(0.0, ge=0)
    """GPUs per Learner."""
    num_gpus_per_env_runner: float = Field(0.0, ge=0)
    """GPUs per EnvRunner."""
    num_cpus_per_env_runner: float = Field(1.0, ge=0)
    """CPUs per EnvRunner."""
    custom_resources_per_env_runner: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    """Custom Ray resources each EnvRunner needs, to pin rollouts to a worker group."""
    custom_resources_per_learner: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    """Custom Ray resources each remote Learner needs, to pin learners to a (GPU) worker group."""
    reward_model_placement: Literal["local", "actor"] = "local"
    """Score in each EnvRunner ('local') or in one shared batched Ray actor ('actor') that the driver starts and owns."""
    reward_model_num_gpus: float = Field(0.0, ge=0)
    """GPUs for the shared reward-model actor (reward_model_placement='actor' only; it asks for no CPU)."""
    reward_model_resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    """Custom Ray resources the shared reward-model actor needs, to pin it to a node group ('actor' only)."""
    restart_failed_env_runners: bool = True
    """Restart an EnvRunner that died and carry on with the iteration."""


class TrainingSections(Protocol):
    """The settings training reads (``cluster.config.Config`` has them all)."""

    model: ModelSettings
    data: DataSettings
    reward_model: RewardModelSettings
    env: EnvSettings
    ppo: PPOSettings
    rollout: RolloutSettings


def absolute_spec(spec: str) -> str:
    """A model spec with a relative directory made absolute (Ray workers run elsewhere)."""
    path = resolve_path(spec)
    return str(path.resolve()) if path.exists() else spec


def env_config(cfg: TrainingSections, seed: int) -> dict[str, Any]:
    """Keyword arguments of :class:`envs.text_env.TextGenerationEnv` (RLlib copies them to every EnvRunner)."""
    model = cfg.model.model_copy(update={"policy": absolute_spec(cfg.model.policy)})
    data = cfg.data.model_copy(update={"prompts": str(resolve_path(cfg.data.prompts).resolve())})
    # A constrained part must be computed even when it carries no weight in the objective.
    weights = {**{name: 0.0 for name in cfg.ppo.constraints}, **cfg.env.reward}
    return {
        "settings": cfg.env.model_copy(update={"reward": weights}),
        "model": model,
        "data": data,
        "reward_model": cfg.reward_model.resolved(),
        "seed": seed,
        "group_size": cfg.ppo.group_size,
        "shared_reward_actor": cfg.rollout.reward_model_placement == "actor",
    }


def module_spec(cfg: TrainingSections) -> RLModuleSpec:
    """The RLModule spec of the LM policy."""
    settings = ModuleSettings(
        model=cfg.model.model_copy(update={"policy": absolute_spec(cfg.model.policy)}),
        temperature=cfg.ppo.temperature,
        reference_dtype=cfg.ppo.reference_dtype,
        critic=cfg.ppo.critic if cfg.ppo.advantage_estimator == "gae" else "none",
    )
    return RLModuleSpec(module_class=LMModule, model_config={"settings": settings.model_dump()})


def build_ppo_config(cfg: TrainingSections, seed: int) -> RLlibPPOConfig:
    """Map the settings onto RLlib's PPOConfig (env, module, learner, scaling, fault tolerance, seed)."""
    p, r, e = cfg.ppo, cfg.rollout, cfg.env
    register_env(RLLIB_ENV, make_text_env)  # RLlib then uses make_text_env as the vector entry point
    tokens = p.episodes_per_iteration * e.max_new_tokens
    per_learner = max(tokens // max(r.num_learners, 1), 1)
    minibatch = min(p.minibatch_episodes * e.max_new_tokens, per_learner)
    return (
        RLlibPPOConfig(algo_class=ResponsePPO)
        .framework("torch")
        .environment(env=RLLIB_ENV, env_config=env_config(cfg, seed), disable_env_checking=True)
        .env_runners(
            num_env_runners=r.num_env_runners,
            num_envs_per_env_runner=r.num_envs_per_env_runner,
            gym_env_vectorize_mode="vector_entry_point",
            num_cpus_per_env_runner=r.num_cpus_per_env_runner,
            num_gpus_per_env_runner=r.num_gpus_per_env_runner,
            custom_resources_per_env_runner=dict(r.custom_resources_per_env_runner),
            env_runner_cls=ResponseEnvRunner,
            batch_mode="complete_episodes",
        )
        .learners(
            num_learners=r.num_learners,
            num_gpus_per_learner=r.num_gpus_per_learner,
            learner_class=LMPPOLearner,
            custom_resources_per_learner=dict(r.custom_resources_per_learner),
            learner_config_dict={"ppo": p.model_dump()},
        )
        .rl_module(rl_module_spec=module_spec(cfg))
        .training(
            lr=p.lr,
            grad_clip=p.grad_clip,
            grad_clip_by="global_norm",
            train_batch_size_per_learner=per_learner,
            minibatch_size=minibatch,
            num_epochs=p.epochs,
            shuffle_batch_per_epoch=False,
            gamma=p.gamma,
            lambda_=p.lambda_,
            clip_param=p.clip_param,
            vf_clip_param=p.vf_clip_param,
            vf_loss_coeff=p.vf_loss_coeff,
            entropy_coeff=p.entropy_coeff,
            use_kl_loss=False,
            kl_coeff=0.0,
        )
        .callbacks([ResponseMetrics, DataPositions])
        .fault_tolerance(restart_failed_env_runners=r.restart_failed_env_runners)
        .debugging(seed=seed)
    )
