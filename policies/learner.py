"""The PPO learner for the language-model policy, and the ``ppo`` section it owns.

On top of RLlib's ``PPOTorchLearner``. Its learner pipeline ends with KL-to-reference reward
shaping, token-level GAE (replacing RLlib's piece) and advantage whitening over the whole
iteration, pooled across Learners (:mod:`policies.advantages`). Each iteration's whole responses
are then cut into seeded minibatches of whole responses (:mod:`policies.minibatches`): every
token is trained exactly ``epochs`` times, on every Learner the same number of steps. The loss is
the clipped PPO surrogate, the PPO2 clipped value loss and an optional entropy bonus
(:mod:`policies.ppo_math`); with several Learners each one's loss is scaled by its share of the
minibatch's tokens, so the DDP-averaged gradient is the mean over every token. The KL coefficient
follows a :class:`~policies.ppo_math.KLController` fed the iteration's KL pooled across Learners,
and is saved with the learner state. RLlib's own KL(old || new) loss term stays off.

Metrics per iteration (means over all minibatches, plus the first minibatch alone, where the
ratio must be exactly 1): ratio mean and max, |ratio - 1|, clipfrac, approx-KL, losses, entropy,
the critic's explained variance, the KL to the reference and the coefficient.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override

from envs.settings import Settings
from policies.advantages import OutcomeAdvantages, ReinforceReturns, TokenGAE, WhitenAdvantages
from policies.constraints import LagrangianReward
from policies.kl_shaping import REF_LOGP, KLStats, KLToReference
from policies.lm_module import ENTROPY, LOGP, Critic
from policies.minibatches import ResponseMinibatches, group_units
from policies.ppo_math import KL_ESTIMATORS, KLController, masked_mean, pg_loss, value_loss

logger = logging.getLogger(__name__)


class PPOSettings(Settings):
    """The ``ppo`` section: iterations and batch sizes, the loss, the optimizers, KL control and rollout sampling."""

    iterations: int = Field(20, ge=1)
    """Training iterations (one rollout + one update each)."""
    episodes_per_iteration: int = Field(64, ge=1)
    """Whole responses per iteration across all EnvRunners: each healthy EnvRunner writes its share (N / EnvRunners, in whole groups) and nothing carries over; the tokens are those responses' tokens (at most N x env.max_new_tokens)."""
    minibatch_episodes: int = Field(16, ge=1)
    """Responses per SGD step across all Learners (each takes its 1/num_learners of them); responses are shuffled (seeded) into minibatches each epoch, so each token is trained exactly `epochs` times."""
    epochs: int = Field(2, ge=1)
    """SGD passes over each iteration's responses."""
    group_size: int = Field(1, ge=1)
    """Responses per prompt within an iteration (k > 1 for GRPO/RLOO): k slots of a vector env answer the same prompt."""
    lr: float = Field(1e-5, gt=0)
    """Adam learning rate of the policy."""
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """'gae': PPO with a critic (token-level GAE, whitened); 'grpo': (score - group mean) / group std, no critic; 'rloo': score minus the mean of the group's other scores, no critic; 'reinforce_pp': REINFORCE++ (per-token returns of the KL-shaped rewards, whitened over the batch), no critic. 'grpo' and 'rloo' need group_size >= 2."""
    grpo_scale_rewards: bool = True
    """GRPO divides by the group's std; false is Dr. GRPO (only the group mean is subtracted: no difficulty bias toward near-unanimous groups)."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference acts: 'reward' (shaped into every token's reward, so the advantage carries it: InstructGPT, our PPO) or 'loss' (a separate term beta * KL in the loss, as GRPO does: the advantage stays pure reward)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimate: k1 = log pi - log pi_ref (unbiased; the one to put in the reward: as a loss its expected gradient is 0); k2 = (log ratio)^2 / 2 (as a loss its gradient is the reverse KL's); k3 = exp(-log ratio) - 1 + log ratio (unbiased, >= 0, low variance: the best estimate of the KL's value, but as a loss its gradient is the forward KL(ref || pi)'s, which pushes hardest on tokens the policy has made rarer; TRL multiplies it by the importance ratio to get the reverse KL's gradient, which k2 gives on-policy)."""
    critic: Critic = "reference"
    """What the value head reads: 'reference' (the frozen reference's final hidden state: no extra pass, the critic never pulls on the policy) or 'policy' (the policy's own, trained through the shared trunk)."""
    vf_lr: float = Field(1e-3, gt=0)
    """Adam learning rate of the value head with critic='reference' (a linear head on frozen features learns nothing at the policy's lr)."""
    vf_loss_coeff: float = Field(0.1, ge=0)
    """Weight of the value loss in the shared trunk's gradient (critic='policy'). With critic='reference' the head has its own Adam, which is invariant to a constant weight, so it is not used."""
    reference_dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights of the frozen reference model: bfloat16 halves its memory and is about 3x faster on GPUs and on CPUs with AMX, at about 0.03 nats/token of log-prob error (on CPUs without fast bfloat16 it is slower)."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""
    clip_param: float = Field(0.2, gt=0, lt=1)
    """PPO ratio clip epsilon."""
    vf_clip_param: float = Field(0.2, gt=0)
    """Value clip around the old value estimate (in reward units)."""
    entropy_coeff: float = Field(0.0, ge=0)
    """Weight of the entropy bonus."""
    gamma: float = Field(1.0, gt=0, le=1)
    """Discount factor."""
    lambda_: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Standardise advantages over every token of the iteration (pooled across Learners), as TRL and OpenRLHF do."""
    kl_coef: float = Field(0.05, ge=0)
    """Initial (or fixed) KL-to-reference penalty coefficient."""
    kl_target: float = Field(4.0, ge=0)
    """Target KL per response in nats for the adaptive controller (0 = fixed coefficient)."""
    kl_horizon_iterations: float = Field(2.0, ge=1)
    """Adaptive KL controller horizon in iterations: the coefficient moves by at most 20% / horizon per iteration (Ziegler et al.'s horizon in responses divided by the responses per iteration)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature during rollouts (the learner's log-probs use the same one)."""
    constraints: dict[str, float] = Field(default_factory=dict)
    """Constrained RLHF (PPO-Lagrangian): reward part -> threshold, maximise the env's reward subject to E[part] >= threshold, e.g. {reward_model.consistency: -0.05}; one Lagrange multiplier per constraint. A head's threshold is in its normalised units: `alignray eval` prints the reference policy's level (rm_score.<criterion>, reference column)."""
    multiplier_init: float = Field(0.0, ge=0)
    """Starting value of every Lagrange multiplier (Safe-RLHF's lambda_init, 1 there): 0 lets the measured violations set the weight; on SmolLM2 with a 128-response window, 1 kept the multiplier near 3 all run and cost the whole objective gain (README, Several criteria)."""
    multiplier_lr: float = Field(3.0, gt=0)
    """Integral gain of the multipliers (the plain update's learning rate): I <- max(0, I + lr e) every iteration, e = threshold - E[part] measured over the last constraint_window responses."""
    constraint_window: int = Field(128, ge=0)
    """Responses each constraint's mean is taken over before it steps the multipliers: the fewest recent iterations holding this many (Safe-RLHF's episode_cost_window_size, 128 in its scripts); 0 = the iteration's own responses alone."""
    multiplier_kp: float = Field(3.0, ge=0)
    """Proportional gain: lambda = max(0, I + kp e), so a violation weighs at once and no more than while it lasts (PI control, Stooke et al. 2020); 0 = the plain gradient-ascent update."""
    top_k: int = 0
    """Must stay 0 for training (see top_p); serving takes top-k/top-p per request."""
    top_p: float = 1.0
    """Must stay 1.0 for training: a truncated sampler draws tokens from a distribution the learner does not optimise, so the PPO ratio and the KL estimate would be taken against a policy that did not write the tokens (TRL and veRL do not train with it either)."""

    @field_validator("top_k", "top_p")
    @classmethod
    def _full_distribution(cls, value, info):
        if value != cls.model_fields[info.field_name].default:
            raise ValueError(
                f"training samples from the full (tempered) distribution, so that the recorded log-prob "
                f"is the one the learner optimises; {info.field_name} is for serving (a request "
                f"parameter), got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _whole_minibatches(self) -> PPOSettings:
        if self.advantage_estimator in ("grpo", "rloo") and self.group_size < 2:
            raise ValueError(
                f"advantage_estimator={self.advantage_estimator} compares the responses to one prompt, so "
                f"it needs group_size >= 2 (got {self.group_size})"
            )
        if self.minibatch_episodes % self.group_size:
            raise ValueError(
                f"minibatch_episodes ({self.minibatch_episodes}) must be a multiple of group_size "
                f"({self.group_size}): a group is never split across minibatches"
            )
        if self.episodes_per_iteration % self.minibatch_episodes:
            raise ValueError(
                f"episodes_per_iteration ({self.episodes_per_iteration}) must be a multiple of "
                f"minibatch_episodes ({self.minibatch_episodes}): every minibatch holds as many responses"
            )
        return self


def _nonzero(coeff) -> bool:
    """Whether an entropy coefficient (a number or a [[timestep, value], ...] schedule) is ever non-zero."""
    if isinstance(coeff, (list, tuple)):
        return any(float(v) != 0.0 for _, v in coeff)
    return float(coeff) != 0.0


class LMPPOLearner(PPOTorchLearner):
    """PPO over token actions: whole-response minibatches, KL-to-reference shaping, an adaptive KL coefficient."""

    @override(PPOTorchLearner)
    def build(self) -> None:
        super().build()
        self.settings = p = PPOSettings.model_validate(self.config.learner_config_dict["ppo"])
        self.kl_controller = KLController(coef=p.kl_coef, target=p.kl_target, horizon=p.kl_horizon_iterations)
        self._updates = 0  # seeds each update's minibatch order; saved with the state
        self._minibatch = 0
        for module_id in self.module.keys():  # the entropy is only a metric unless the bonus is on
            self.module[module_id].unwrapped().entropy_grad = _nonzero(self.config.entropy_coeff)
        self.constraint_connector = LagrangianReward(
            thresholds=dict(p.constraints),
            init=p.multiplier_init,
            kp=p.multiplier_kp,
            ki=p.multiplier_lr,
            window=p.constraint_window,
            all_reduce_sum=self._all_reduce_sum,
        )
        shaping = KL_ESTIMATORS[p.kl_estimator] if p.kl_in == "reward" else None
        self.kl_connector = KLToReference(controller=self.kl_controller, shaping=shaping)
        self.gae_connector = TokenGAE(gamma=self.config.gamma, lambda_=self.config.lambda_)
        pipe = self._learner_connector
        if pipe is not None and self.config.add_default_connectors_to_learner_pipeline:
            pipe.remove("GeneralAdvantageEstimation")
            for connector in self._advantage_pipeline(p):
                pipe.append(connector)

    def _advantage_pipeline(self, p: PPOSettings) -> list[ConnectorV2]:
        """The connectors after RLlib's: constraints, the reference pass (and KL shaping), then the chosen estimator."""
        whiten = WhitenAdvantages(all_reduce_sum=self._all_reduce_sum)
        first = ([self.constraint_connector] if p.constraints else []) + [self.kl_connector]
        if p.advantage_estimator == "gae":
            return first + [self.gae_connector] + ([whiten] if p.whiten_advantages else [])
        if p.advantage_estimator == "reinforce_pp":
            return first + [ReinforceReturns(gamma=self.config.gamma), whiten]
        return first + [OutcomeAdvantages(estimator=p.advantage_estimator, scale=p.grpo_scale_rewards)]

    @override(PPOTorchLearner)
    def _create_iterator_if_necessary(self, *, training_data, num_epochs=1, **kwargs):
        """Seeded minibatches of whole responses (groups), after the connectors ran once over the whole shard."""
        if training_data.episodes is None:
            return super()._create_iterator_if_necessary(training_data=training_data, num_epochs=num_epochs, **kwargs)
        batch = self._make_batch_if_necessary(training_data=training_data)
        episodes = list(
            ConnectorV2.single_agent_episode_iterator(training_data.episodes, agents_that_stepped_only=False)
        )
        units = group_units(episodes)
        per = self.settings.minibatch_episodes // self.settings.group_size // max(self.config.num_learners, 1)
        rng = np.random.default_rng([self.config.seed or 0, self._updates])
        self._updates, self._minibatch = self._updates + 1, 0
        return ResponseMinibatches(batch, [len(e) for e in episodes], units, per, num_epochs, rng)

    @override(PPOTorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: dict[str, Any], fwd_out: dict[str, Any]):
        module = self.module[module_id].unwrapped()
        mask = batch[Columns.LOSS_MASK].bool()  # (N,) False on the bootstrap rows
        advantages = batch[Postprocessing.ADVANTAGES]  # (N,) already whitened over the iteration
        logp, old_logp = fwd_out[LOGP], batch[Columns.ACTION_LOGP].float()  # (N,)
        policy_loss, clipfrac = pg_loss(logp, old_logp, advantages, config.clip_param, mask)
        vf_loss = torch.zeros(())
        if hasattr(module, "vf_head"):  # critic-free estimators have none
            values = module.compute_values(batch, fwd_out.get(Columns.EMBEDDINGS))  # (N,)
            vf_loss = value_loss(
                values, batch[Columns.VF_PREDS], batch[Postprocessing.VALUE_TARGETS], config.vf_clip_param, mask
            )
        entropy = masked_mean(fwd_out[ENTROPY], mask)
        entropy_coeff = self.entropy_coeff_schedulers_per_module[module_id].get_current_value()
        # The reference critic's head has its own Adam: a weight on its loss would cancel (see vf_loss_coeff).
        vf_weight = config.vf_loss_coeff if self.settings.critic == "policy" else 1.0
        total = policy_loss + vf_weight * vf_loss - entropy_coeff * entropy
        if self.settings.kl_in == "loss":  # beta * KL(pi || ref), the gradient through the current log-probs
            kl_loss = masked_mean(KL_ESTIMATORS[self.settings.kl_estimator](logp, batch[REF_LOGP]), mask)
            total = total + self.kl_controller.coef * kl_loss
            self.metrics.log_value((module_id, "kl_loss"), float(kl_loss.detach()), reduce="mean")
        total = total * self._token_share(mask)
        self._log_minibatch(module_id, logp.detach(), old_logp, mask, policy_loss, vf_loss, entropy, clipfrac)
        return total

    def _token_share(self, mask: torch.Tensor) -> float:
        """Learners x this Learner's share of the minibatch's tokens: DDP's mean of gradients becomes the token mean."""
        learners = max(self.config.num_learners, 1)
        if learners == 1:
            return 1.0
        tokens = float(mask.sum())
        return tokens * learners / max(self._all_reduce_sum([tokens])[0], 1.0)

    def _log_minibatch(self, module_id, logp, old_logp, mask, policy_loss, vf_loss, entropy, clipfrac) -> None:
        """Means over every minibatch of the update, and the first minibatch alone (where the ratio must be 1)."""
        ratio = torch.exp(logp - old_logp)
        log_ratio = logp - old_logp
        stats = {
            "policy_loss": policy_loss.detach(),
            "vf_loss": vf_loss.detach(),
            "entropy": entropy.detach(),
            "clipfrac": clipfrac,
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_dev": masked_mean((ratio - 1).abs(), mask),
        }
        for name, value in stats.items():
            self.metrics.log_value((module_id, name), float(value), reduce="mean")
        self.metrics.log_value((module_id, "ratio_max"), float(ratio[mask].max()), reduce="max")
        if self._minibatch == 0:
            for name in ("clipfrac", "approx_kl", "ratio_dev"):
                self.metrics.log_value((module_id, f"first_{name}"), float(stats[name]), window=1)
        self._minibatch += 1

    @override(PPOTorchLearner)
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        """Fused Adam (10x faster than the default per-tensor loop on CPU) for the LM; its own for the value head."""
        module = self.module[module_id].unwrapped()
        head = list(module.vf_head.parameters()) if hasattr(module, "vf_head") else []
        lm = [
            p for p in self.get_parameters(self.module[module_id]) if p.requires_grad and all(p is not h for h in head)
        ]
        settings = PPOSettings.model_validate(config.learner_config_dict["ppo"])
        vf_lr = settings.vf_lr if settings.critic == "reference" else config.lr
        parts = (("policy", lm, config.lr), ("value", head, vf_lr))
        for name, params, lr in (part for part in parts if part[1]):
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                params=params,
                lr_or_lr_schedule=lr,
                optimizer=torch.optim.Adam(params, fused=True),
            )

    @override(PPOTorchLearner)
    def apply_gradients(self, gradients_dict) -> None:
        """Step every optimizer; non-finite gradients are zeroed as RLlib does, but found with one fused norm.

        RLlib's version runs ``isfinite(grad).all()`` twice per tensor (about 0.4 s per step for a 135M model
        on CPU, a third of a forward pass).
        """
        if self._lr_scheduler_classes is not None or self._grad_scalers is not None:
            return super().apply_gradients(gradients_dict)
        grads = [g for g in gradients_dict.values() if g is not None]
        finite = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if not finite and self.config.torch_skip_nan_gradients:
            logger.warning("Skipping this update: its gradients contain nan/inf values.")
            return
        for pid, grad in gradients_dict.items():
            if not finite and grad is not None and not torch.isfinite(grad).all():
                logger.warning("Gradients of %s contain nan/inf values; setting them to zero.", pid)
                grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            self._params[pid].grad = grad
        for module_id, names in self._module_optimizers.items():
            for name in names:
                self.get_optimizer(module_id, name).step()

    @override(PPOTorchLearner)
    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        kl = pooled_kl(self.kl_connector.last, self._all_reduce_sum)
        constraints = self.constraint_connector  # no multipliers, no means without ppo.constraints
        coef_used = self.kl_controller.coef
        self.kl_controller.update(kl)
        for module_id in self.module.keys():
            self.metrics.log_dict(
                {
                    "kl_ref": kl,
                    "kl_coef_used": coef_used,
                    "kl_coef": self.kl_controller.coef,
                    "kl_target": self.settings.kl_target,
                    "kl_ref_k3": self.kl_connector.last.kl_k3_sum / max(self.kl_connector.last.responses, 1),
                    "vf_explained_var": self.gae_connector.explained_variance,
                    **{f"multiplier.{n}": lam for n, lam in constraints.multipliers.items()},
                    **{f"constraint.{n}": v for n, v in constraints.means.items()},
                    **{f"constraint_batch.{n}": v for n, v in constraints.batch_means.items()},
                },
                key=module_id,
                window=1,
            )

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum values over all Learners (identity with one), so every Learner sees the same totals."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    @override(PPOTorchLearner)
    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        state = super().get_state(components, not_components=not_components, **kwargs)
        state["kl_controller"] = {"coef": self.kl_controller.coef}
        state["minibatch_updates"] = self._updates
        state["multipliers"] = dict(self.constraint_connector.multipliers)
        state["multiplier_integrals"] = dict(self.constraint_connector.integrals)
        state["constraint_history"] = {n: list(h) for n, h in self.constraint_connector.history.items()}
        return state

    @override(PPOTorchLearner)
    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if "kl_controller" in state:
            self.kl_controller.coef = float(state["kl_controller"]["coef"])
        self._updates = int(state.get("minibatch_updates", self._updates))
        c = self.constraint_connector
        c.multipliers.update(state.get("multipliers", {}))
        c.integrals.update(state.get("multiplier_integrals", state.get("multipliers", {})))  # older: lambda = I
        c.history.update({n: [tuple(e) for e in h] for n, h in state.get("constraint_history", {}).items()})


def pooled_kl(stats: KLStats, all_reduce_sum) -> float:
    """Mean per-response KL of the whole iteration across Learners, from this Learner's :class:`KLStats`."""
    kl_sum, responses = all_reduce_sum([stats.kl_sum, float(stats.responses)])
    return kl_sum / responses if responses > 0 else 0.0
