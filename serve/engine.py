"""Batched text generation with a Hugging Face causal LM: plain Python, no Ray.

A :class:`GenerationJob` is one sequence to write: prompt token ids and its own sampling
parameters (max tokens, temperature, top-p, stop strings, seed). :meth:`GenerationEngine.stream`
runs any number of jobs as one batch: the prompts are left-padded into one ``(B, T)`` tensor,
prefilled once, then decoded one token per step for every row with a shared KV cache. Each
step yields, for every job, the text it added (a :class:`Delta`) or ``None`` once it has
finished, so the same loop serves streaming and non-streaming requests.

A job finishes with ``finish_reason="stop"`` on EOS or a stop string (the stop string is not
returned) and with ``"length"`` after ``max_tokens`` tokens. Text that could be the start of a
stop string is held back until it is known not to be one.

Input problems (empty prompt, prompt longer than the context, ``max_tokens`` over the limit)
raise :class:`InputError` naming the parameter; the HTTP layer turns them into 400s.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from envs.models import ModelSettings, load_causal_lm
from envs.prompting import chat_ids, left_pad
from policies.sampling import sample_tokens


class InputError(ValueError):
    """A request the model cannot serve; ``param`` names the offending request field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class GenerationJob:
    """One sequence to generate."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    """Treat EOS as an ordinary token (benchmarks that need exactly max_tokens tokens)."""


@dataclass
class Delta:
    """What one decoding step added to one job."""

    text: str
    finish_reason: str | None = None
    """'stop' or 'length' on the job's last step, else None."""
    completion_tokens: int = 0
    """Tokens generated for the job so far."""


@dataclass
class Completion:
    """A finished job."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def sample_next(logits: torch.Tensor, jobs: list[GenerationJob], generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``logits`` (B, V) with each job's temperature, top-p and random stream -> (B,)."""
    temperature = torch.tensor([[j.temperature] for j in jobs])  # (B, 1)
    top_p = torch.tensor([[j.top_p] for j in jobs])  # (B, 1)
    u = torch.stack([torch.rand((), generator=g) for g in generators])  # (B,)
    return sample_tokens(logits, temperature, top_p=top_p, u=u)[0]


class GenerationEngine:
    """A causal LM and its tokenizer, with prompt checks and batched, streamable generation."""

    def __init__(self, model, tokenizer, max_tokens_limit: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_tokens_limit = max_tokens_limit
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())

    @classmethod
    def from_spec(cls, model: ModelSettings, max_tokens_limit: int) -> GenerationEngine:
        """Load the model the settings name ('smollm2', 'tiny', an HF directory) with :func:`load_causal_lm`."""
        lm, tok = load_causal_lm(model.policy, model.dtype, model.tiny_vocab_size)
        return cls(lm, tok, max_tokens_limit=max_tokens_limit)

    # ---- prompts and checks -------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a completion prompt."""
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, ready for the assistant turn (see :func:`envs.prompting.chat_text`)."""
        return chat_ids(self.tokenizer, messages)

    def make_job(
        self,
        prompt_ids: list[int],
        max_tokens: int | None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        default_max_tokens: int = 16,
        param: str = "prompt",
        ignore_eos: bool = False,
    ) -> GenerationJob:
        """Check a prompt and its parameters against the model and the limits; build the job."""
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise InputError(f"{param} is empty after tokenization", param=param)
        room = self.context_length - n_prompt
        if room < 1:
            raise InputError(
                f"This model's maximum context length is {self.context_length} tokens, but the {param} "
                f"has {n_prompt} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(default_max_tokens, self.max_tokens_limit, room)
        if max_tokens > self.max_tokens_limit:
            raise InputError(
                f"max_tokens is {max_tokens}, more than this server's limit of "
                f"{self.max_tokens_limit} (serve.max_tokens_limit)",
                param="max_tokens",
            )
        if n_prompt + max_tokens > self.context_length:
            raise InputError(
                f"This model's maximum context length is {self.context_length} tokens, but {n_prompt} "
                f"prompt tokens plus max_tokens={max_tokens} exceed it.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return GenerationJob(
            prompt_ids=list(prompt_ids),
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            stop=list(stop or []),
            seed=seed,
            ignore_eos=ignore_eos,
        )

    # ---- generation ---------------------------------------------------------------------------

    def _prefill(self, jobs: list[GenerationJob]) -> tuple[torch.Tensor, torch.Tensor, object, torch.Tensor]:
        """Left-pad the prompts and run them once: (last logits (B, V), mask (B, T), cache, positions (B, 1))."""
        ids, mask = left_pad([j.prompt_ids for j in jobs], self.pad_id)  # (B, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], mask, out.cache, positions[:, -1:]

    def stream(self, jobs: list[GenerationJob]) -> Iterator[list[Delta | None]]:
        """Generate all jobs as one batch; per step, yield each job's :class:`Delta` (None once finished)."""
        if not jobs:
            return
        generators = [
            torch.Generator().manual_seed(j.seed if j.seed is not None else random.getrandbits(63)) for j in jobs
        ]
        tokens: list[list[int]] = [[] for _ in jobs]
        sent = [0] * len(jobs)  # characters already returned per job
        done = [False] * len(jobs)
        with torch.inference_mode():
            logits, mask, cache, positions = self._prefill(jobs)
        while True:
            with torch.inference_mode():
                next_ids = sample_next(logits, jobs, generators)  # (B,)
            step: list[Delta | None] = []
            for i, job in enumerate(jobs):
                if done[i]:
                    step.append(None)
                    continue
                step.append(self._advance(job, tokens[i], int(next_ids[i]), sent, i))
                done[i] = step[-1].finish_reason is not None
            yield step
            if all(done):
                return
            with torch.inference_mode():
                mask = torch.cat([mask, torch.ones((len(jobs), 1), dtype=mask.dtype)], dim=1)  # (B, T+1)
                positions = positions + 1  # (B, 1)
                out = self.model(
                    input_ids=next_ids.unsqueeze(1),
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                )
                logits, cache = out.logits[:, -1], out.cache

    def _advance(self, job: GenerationJob, tokens: list[int], token: int, sent: list[int], i: int) -> Delta:
        """Append one token to a job, decode, check EOS / stop strings / length; return the new text."""
        eos = token in self.eos_ids and not job.ignore_eos
        if not eos:
            tokens.append(token)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        finish = "stop" if eos else None
        cut = [text.find(s, max(0, sent[i] - len(s))) for s in job.stop]
        hits = [c for c in cut if c >= 0]
        if hits:
            text, finish = text[: min(hits)], "stop"
        elif finish is None and len(tokens) >= job.max_tokens:
            finish = "length"
        end = len(text) if finish else len(text) - _held_back(text, job.stop)
        if not finish and text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            end = min(end, len(text) - 1)
        delta = text[sent[i] : end] if end > sent[i] else ""
        sent[i] = max(sent[i], end)
        return Delta(text=delta, finish_reason=finish, completion_tokens=len(tokens))

    def generate(self, jobs: list[GenerationJob]) -> list[Completion]:
        """Run :meth:`stream` to the end and gather each job's text."""
        texts = [""] * len(jobs)
        last: list[Delta | None] = [None] * len(jobs)
        for step in self.stream(jobs):
            for i, d in enumerate(step):
                if d is not None:
                    texts[i] += d.text
                    last[i] = d
        return [
            Completion(
                text=t,
                finish_reason=d.finish_reason,
                prompt_tokens=len(j.prompt_ids),
                completion_tokens=d.completion_tokens,
            )
            for t, d, j in zip(texts, last, jobs)
        ]

    def check_health(self) -> None:
        """Run one token through the model; raise RuntimeError if the logits are not finite."""
        with torch.inference_mode():
            ids = torch.tensor([[self.pad_id if self.pad_id is not None else 0]])
            logits = self.model(input_ids=ids, use_cache=False).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("model health check failed: the logits are not finite (broken weights?)")
