"""Text generation with a Hugging Face causal LM, one sequence at a time on the text side: plain Python, no Ray.

A :class:`GenerationJob` is one sequence to write: prompt token ids and its own sampling
parameters (max tokens, temperature, top-p, stop strings, seed). :class:`GenerationEngine` holds
the model (in its serving dtype) and tokenizer, checks prompts and limits (:meth:`~GenerationEngine.make_job`),
and turns each sampled token of a sequence into the text it adds (:meth:`~GenerationEngine.advance`,
a :class:`Delta`). Batching lives elsewhere: :mod:`serve.kv_batch` keeps the rows of the running
batch in one KV cache and :mod:`serve.scheduler` decides which sequences join and leave it.

A job finishes with ``finish_reason="stop"`` on EOS or a stop string (the stop string is not
returned) and with ``"length"`` after ``max_tokens`` tokens. Text that could be the start of a
stop string is held back until it is known not to be one.

Input problems (empty prompt, prompt longer than the context, ``max_tokens`` over the limit)
raise :class:`InputError` naming the parameter; the HTTP layer turns them into 400s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from envs.models import ModelSettings
from envs.prompting import chat_ids
from policies.sampling import filter_logits, sample_tokens
from serve.quantize import load_policy, resolve_dtype


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


@dataclass(eq=False)
class Decoding:
    """The text side of one sequence being generated: its job, random stream, tokens and the characters sent."""

    job: GenerationJob
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    finish: str | None = None
    """'stop' or 'length' once the sequence has ended."""


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
    u = torch.stack([torch.rand((), generator=g) for g in generators])  # (B,)
    logits = logits.float()
    nucleus = [i for i, j in enumerate(jobs) if j.top_p < 1.0]
    if nucleus:  # top-p sorts the vocabulary (a third of a SmolLM2 decoding step at B=16): only rows that ask
        rows = torch.tensor(nucleus)
        top_p = torch.tensor([[jobs[i].top_p] for i in nucleus])  # (b, 1)
        logits = logits.index_put((rows,), filter_logits(logits[rows], top_p=top_p))  # a copy: the caller's stays
    return sample_tokens(logits, temperature, u=u)[0]


class GenerationEngine:
    """A causal LM (in its serving dtype) and its tokenizer: prompt checks, sampling parameters, decoded text."""

    def __init__(self, model, tokenizer, max_tokens_limit: int, dtype: str = "float32"):
        self.model = model.eval()
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.max_tokens_limit = max_tokens_limit
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())

    @classmethod
    def from_spec(
        cls, model: ModelSettings, max_tokens_limit: int, dtype: str = "float32", pack_weights: bool = True
    ) -> GenerationEngine:
        """Load the model the settings name ('smollm2', 'tiny', an HF directory) in a serving dtype ('auto' resolved)."""
        dtype = resolve_dtype(dtype)
        lm, tok = load_policy(model, dtype, pack=pack_weights)
        return cls(lm, tok, max_tokens_limit=max_tokens_limit, dtype=dtype)

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

    # ---- one sequence's text ----------------------------------------------------------------

    def start(self, job: GenerationJob) -> Decoding:
        """The decoding state of a job, with its own random stream (seeded, or fresh)."""
        seed = job.seed if job.seed is not None else random.getrandbits(63)
        return Decoding(job, torch.Generator().manual_seed(seed))

    def advance(self, dec: Decoding, token: int) -> Delta:
        """Append one token, decode, check EOS / stop strings / length; return the text it adds (maybe '')."""
        job, tokens = dec.job, dec.tokens
        eos = token in self.eos_ids and not job.ignore_eos
        if not eos:
            tokens.append(token)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        finish = "stop" if eos else None
        cut = [text.find(s, max(0, dec.sent - len(s))) for s in job.stop]
        hits = [c for c in cut if c >= 0]
        if hits:
            text, finish = text[: min(hits)], "stop"
        elif finish is None and len(tokens) >= job.max_tokens:
            finish = "length"
        end = len(text) if finish else len(text) - _held_back(text, job.stop)
        if not finish and text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            end = min(end, len(text) - 1)
        delta = text[dec.sent : end] if end > dec.sent else ""
        dec.sent, dec.finish = max(dec.sent, end), finish
        return Delta(text=delta, finish_reason=finish, completion_tokens=len(tokens))

    def check_health(self) -> None:
        """Run one token through the model; raise RuntimeError if the logits are not finite."""
        with torch.inference_mode():
            ids = torch.tensor([[self.pad_id if self.pad_id is not None else 0]])
            logits = self.model(input_ids=ids, use_cache=False).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("model health check failed: the logits are not finite (broken weights?)")
