"""The world the policy acts in: the text-generation Gymnasium env, prompt and preference data,
reward functions, the reward model and its training, and the model specs they all load.

The lowest layer: it imports nothing from ``policies``, ``serve`` or ``cluster``. Importing it
registers ``alignray/TextGeneration-v0`` with Gymnasium (without loading any model);
``gym.make(ENV_ID)`` with no arguments gives an env on the shipped prompts with the embedded
SmolLM2 tokenizer and the gold (VADER) reward, which needs no trained reward model.
"""

import gymnasium as gym

ENV_ID = "alignray/TextGeneration-v0"

if ENV_ID not in gym.registry:
    gym.register(
        ENV_ID,
        entry_point="envs.text_env:TextGenerationEnv",
        vector_entry_point="envs.text_vector_env:TextGenerationVectorEnv",
        kwargs={"settings": {"reward": {"gold": 1.0}}},
    )
