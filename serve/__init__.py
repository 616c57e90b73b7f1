"""Ray Serve applications: the OpenAI-compatible policy server (protocol, HTTP guard, generation
engine, deployment), the reward-model deployment, and the application that composes them.

Third layer: imports ``envs`` and ``policies`` (model specs, the sampler), never ``cluster``.
"""
