"""The agent: the RLlib RLModule around a causal LM (sampling with a prefix KV cache), the PPO
learner with KL to the reference and advantage estimators, the maths behind them, the one
adapter from alignray's settings to RLlib, evaluation measures and export to Hugging Face.

Second layer: imports ``envs`` (the env it acts in, model specs), never ``serve`` or ``cluster``.
"""
