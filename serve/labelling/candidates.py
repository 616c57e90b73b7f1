"""Where items come from: the policy deployment (through a handle), or a Parquet file of candidate pairs.

:class:`PolicyCandidates` asks the policy deployment (``serve.app.PolicyServer``) for two
responses per prompt, formatted as the environment formats prompts (instruction, chat
template), so people judge what RL will optimise. Pairs with an empty or identical response
are dropped: there is nothing to compare.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from dataclasses import dataclass, field

from fastapi import Response

from envs.data import load_candidates
from serve.labelling.store import LabelStore
from serve.protocol import ChatCompletionRequest, CompletionRequest


@dataclass
class GenerationSpec:
    """How to ask the policy deployment for a candidate pair."""

    model_name: str
    """The name the policy deployment serves (its ``model`` field)."""
    prompts: list[str]
    """Prompts to draw from (training prompts)."""
    policy: str
    """Recorded with each item (the export's ``policy`` column)."""
    instruction: str = ""
    chat_template: bool = True
    max_tokens: int = 48
    temperature: float = 1.0
    seed: int = 0
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("GenerationSpec needs at least one prompt")
        self.rng = random.Random(self.seed)


class PolicyCandidates:
    """Candidate pairs from the policy deployment's handle."""

    def __init__(self, handle, spec: GenerationSpec):
        self.handle, self.spec = handle, spec

    async def _pair(self, prompt: str, seed: int) -> tuple[str, str]:
        s = self.spec
        content = f"{s.instruction}\n\n{prompt}" if s.instruction else prompt
        common = {"model": s.model_name, "n": 2, "max_tokens": s.max_tokens, "temperature": s.temperature, "seed": seed}
        if s.chat_template:
            body = ChatCompletionRequest(messages=[{"role": "user", "content": content}], **common)
            out = await self.handle.chat_completions.remote(body, Response())
            texts = [c.message.content for c in out.choices]
        else:
            out = await self.handle.completions.remote(CompletionRequest(prompt=content, **common), Response())
            texts = [c.text for c in out.choices]
        return texts[0].strip(), texts[1].strip()

    async def batch(self, n: int) -> tuple[list[dict], list[str]]:
        """Up to n new candidate rows (prompt, response_a, response_b, policy) and their unique keys."""
        s = self.spec
        prompts = [s.rng.choice(s.prompts) for _ in range(n)]
        seeds = [s.rng.randrange(2**31) for _ in range(n)]
        # Concurrent calls: the policy deployment gathers them into one batched generation.
        pairs = await asyncio.gather(*(self._pair(p, seed) for p, seed in zip(prompts, seeds)))
        rows = [
            {"prompt": p, "response_a": a, "response_b": b, "policy": s.policy}
            for p, (a, b) in zip(prompts, pairs)
            if a and b and a != b
        ]
        return rows, [uuid.uuid4().hex for _ in rows]


def candidate_keys(round_: int, rows: list[dict]) -> list[str]:
    """Content keys: loading the same file into the same round twice adds nothing."""
    return [
        hashlib.sha256(f"{round_}\0{r['prompt']}\0{r['response_a']}\0{r['response_b']}".encode()).hexdigest()[:40]
        for r in rows
    ]


def load_candidate_file(store: LabelStore, path, round_: int = 0, policy: str = "") -> int:
    """Add a candidate Parquet file's pairs to the store as items of `round_`; returns how many were new."""
    rows = [{"policy": policy or "unknown", **r} for r in load_candidates(path)]
    return store.add_items(round_, rows, candidate_keys(round_, rows))
