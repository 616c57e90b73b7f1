"""The language-model policy as an RLlib new-API-stack ``TorchRLModule``.

- EnvRunners (``inference_only``) hold only the causal LM. ``_forward_exploration`` samples the
  next token with temperature / top-k / top-p through a private prefix-keyed KV cache and
  returns only ``actions`` and ``action_logp`` (never full-vocabulary logits, which RLlib would
  store for every token of every episode). ``_forward_inference`` decodes greedily.
- The Learner also holds a frozen reference copy of the initial LM (for the KL penalty, in
  ``reference_dtype``) and a value head (``ValueFunctionAPI``) that reads the *reference*
  model's final hidden state. One no-grad reference pass per train batch therefore gives both
  the reference log-probs and the old values (stored as the ``ref_hidden`` column), and the
  value loss trains the head on those cached features: a PPO update costs one policy
  forward+backward plus one reference forward, with no separate value pass, and the critic's
  gradients never disturb the policy. Both are listed in ``get_non_inference_attributes`` so
  EnvRunners never build or receive them. The reference model is kept out of ``state_dict``
  (it is rebuilt from the model spec), so checkpoints and weight syncs carry only the policy
  and value head.
- ``_forward_train`` packs each episode's rows into one causal pass (:mod:`policies.packing`)
  and puts the LM head only on the generated-token rows; the entropy (a metric unless the
  entropy bonus is on) is computed without a graph when ``entropy_grad`` is False.

The module's ``model_config`` is ``{"settings": ModuleSettings(...).model_dump()}``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from torch import nn

from envs.models import ModelSettings, load_causal_lm
from envs.settings import Settings
from policies.kv_cache import PrefixKVCache
from policies.packing import pack_rows, packed_hidden
from policies.ppo_math import entropy_from_logp
from policies.sampling import sample_tokens, scaled_logp

LOGP = "logp"
ENTROPY = "entropy"
REF_HIDDEN = "ref_hidden"  # (N, H) float32 final hidden state of the reference model at each row


class ModuleSettings(Settings):
    """What the RLModule needs (built by the RLlib adapter from the ``model`` and ``ppo`` sections)."""

    model: ModelSettings
    """The policy model."""
    temperature: float
    """Sampling temperature of rollouts (the learner's log-probs use the same one)."""
    reference_dtype: Literal["float32", "bfloat16"]
    """Weights of the frozen reference model on the Learner."""


class LMModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI):
    """Causal LM policy (+ value head and reference model on the Learner)."""

    @override(TorchRLModule)
    def setup(self) -> None:
        super().setup()
        self.settings = ModuleSettings.model_validate(self.model_config["settings"])
        m = self.settings.model
        self.spec = (m.policy, m.dtype, m.tiny_vocab_size)
        self.temperature = self.settings.temperature
        self.lm, _ = load_causal_lm(*self.spec)
        self._kv = PrefixKVCache()
        self.entropy_grad = True  # the learner turns this off when the entropy bonus is 0
        if self.inference_only:
            self.eval()  # EnvRunners only sample: no train/eval toggling of every submodule per step
        else:
            hidden = self.lm.config.get_text_config().hidden_size
            self.vf_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.vf_head.weight)
            nn.init.zeros_(self.vf_head.bias)
            ref, _ = load_causal_lm(*self.spec)
            ref = ref.to(getattr(torch, self.settings.reference_dtype))
            ref.requires_grad_(False)
            object.__setattr__(self, "_ref_lm", ref.eval())  # not a submodule: no state, no optimizer

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["vf_head", "_ref_lm"]

    # -- EnvRunner side ------------------------------------------------------------------

    def next_token_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Next-token logits (B, V) of each slot's context, through the prefix KV cache."""
        obs = batch[Columns.OBS]
        return self._kv.next_logits(self.lm, obs["input_ids"], obs["length"])

    @override(TorchRLModule)
    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        with torch.no_grad():
            actions, logp = sample_tokens(self.next_token_logits(batch), self.temperature)
        return {Columns.ACTIONS: actions, Columns.ACTION_LOGP: logp}

    @override(TorchRLModule)
    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        with torch.no_grad():
            return {Columns.ACTIONS: self.next_token_logits(batch).argmax(-1)}

    @override(TorchRLModule)
    def set_state(self, state) -> None:
        super().set_state(state)
        self._kv.clear()  # cached keys/values belong to the old weights

    # -- Learner side --------------------------------------------------------------------

    def _hidden(self, lm, batch: dict[str, Any]) -> torch.Tensor:
        """Final hidden state at each row's last context token, packed per episode. (N, H)."""
        obs = batch[Columns.OBS]
        return packed_hidden(lm.base_model, pack_rows(obs["input_ids"], obs["length"]))

    def _token_logp(self, lm, hidden: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob of each row's action (N,), tempered log-probs (N, V)) from hidden states (N, H)."""
        logits = lm.get_output_embeddings()(hidden.to(lm.dtype))
        logp_all = scaled_logp(logits, self.temperature)  # (N, V) float32
        return logp_all.gather(-1, actions.long()[:, None]).squeeze(-1), logp_all

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        hidden = self._hidden(self.lm, batch)  # (N, H)
        logp, logp_all = self._token_logp(self.lm, hidden, batch[Columns.ACTIONS])
        with torch.set_grad_enabled(self.entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logp(logp_all)
        return {LOGP: logp, ENTROPY: entropy, Columns.EMBEDDINGS: hidden}

    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        """Value of each row's state (N,) from the reference model's hidden state (the batch's ``ref_hidden``, else a no-grad reference pass)."""
        features = batch.get(REF_HIDDEN)
        if features is None:
            features = self.reference_hidden(batch).float()
        return self.vf_head(features).squeeze(-1)

    @torch.no_grad()
    def reference_hidden(self, batch: dict[str, Any]) -> torch.Tensor:
        """Final hidden state of the frozen reference at each row (N, H), in the reference's dtype."""
        ref = self._ref_lm
        if ref.device != self.lm.device:
            ref.to(self.lm.device)
        return self._hidden(ref, batch)

    @torch.no_grad()
    def reference_pass(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One packed forward of the frozen reference: (log-prob of each row's action (N,), float32 hidden state (N, H))."""
        hidden = self.reference_hidden(batch)
        return self._token_logp(self._ref_lm, hidden, batch[Columns.ACTIONS])[0], hidden.float()
