"""The learned reward model: one shared text encoder, token pooling, and one scalar head per criterion.

Pooling is ``mean`` (the encoder's own sentence embedding) or ``sum``: a sum keeps the evidence
of a few strongly worded tokens from being diluted by the length of the text, which suits
lexicon-like preferences (sentiment) where one "wonderful" counts the same in a long answer.

Heads (``RewardModel.criteria``, in order; the first is the default everywhere a criterion is
not named, so single-criterion callers never change):

- a response head (``nn.Linear(H, 1)``) reads the pooled response embedding ``e_r`` alone;
- a prompt head (criteria in ``prompt_heads``, e.g. ``consistency``: whether the response keeps
  to its prompt cannot be judged from the response alone) reads ``[e_r, e_p, e_r * e_p,
  |e_r - e_p|]`` through a small MLP, where ``e_p`` is the same encoder's embedding of the
  prompt alone. Texts and prompts are encoded separately, so the encoder stays shared and each
  distinct text (and each distinct prompt) is encoded once per batch however many heads read it.

Saved as a Hugging Face directory: the encoder's ``save_pretrained`` files and tokenizer, plus
``reward_head.safetensors`` (every head, keys ``<criterion>.<parameter>``) and
``alignray_reward.json`` (max length, whether the prompt is prepended, pooling, the criteria,
which heads see the prompt, and each head's score mean/std measured on the training data for
normalisation). A directory written before heads had names (one ``weight`` key) loads as one
response head named ``overall``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn

from envs.data import DEFAULT_CRITERION, NAME_PATTERN, resolve_path
from envs.models import ModelLoadError, load_encoder
from envs.settings import Settings

META_FILE = "alignray_reward.json"
HEAD_FILE = "reward_head.safetensors"


class RewardModelSettings(Settings):
    """The ``reward_model`` section: the learned reward model, where it lives, and how `train-rm` trains it."""

    backbone: str = "minilm"
    """Encoder: 'minilm' (embedded all-MiniLM-L6-v2), 'tiny' (random, tests), a local HF directory or a hub id."""
    path: str = "runs/reward_model"
    """Where `train-rm` writes the trained reward model (HF directory) and `train` reads it."""
    epochs: int = Field(3, ge=1)
    """Passes over the training pairs."""
    batch_size: int = Field(128, ge=1)
    """Compared pairs per optimizer step, each with its label of every criterion (a prompt's comparisons stay together; each response is encoded once)."""
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate (peak; linear warm-up over the first 10% of steps, then linear decay)."""
    max_length: int = Field(96, ge=8)
    """Tokens per text fed to the encoder (prompt + response), truncated from the left."""
    include_prompt: bool = False
    """Encode prompt + response as the response text (every head) instead of the response alone."""
    pooling: Literal["mean", "sum"] = "mean"
    """How token states become one vector: 'mean', or 'sum' (strong words are not diluted by length)."""
    max_pairs: int = Field(0, ge=0)
    """Train on only the first N compared pairs (0 = all)."""
    score_batch_size: int = Field(64, ge=1)
    """Texts per forward pass when scoring."""
    criteria: list[str] = Field(default_factory=list)
    """Heads to train, in order; the first is the default head (the 'reward_model' reward part). Empty = every criterion in the preference file, 'overall' first, then in order of appearance."""
    prompt_heads: list[str] = Field(default_factory=lambda: ["consistency"])
    """Criteria whose head also reads the prompt's embedding (an MLP on [e_r, e_p, e_r*e_p, |e_r-e_p|]); the others read the response alone."""
    head_width: int = Field(256, ge=1)
    """Hidden units of a prompt head's MLP."""

    @field_validator("criteria", "prompt_heads")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if not NAME_PATTERN.fullmatch(c)]
        if bad:
            raise ValueError(f"criterion names are a-z, 0-9 and _, starting with a letter; got {bad[0]!r}")
        if len(set(v)) != len(v):
            raise ValueError(f"criteria must be distinct, got {v}")
        return v

    def resolved(self) -> RewardModelSettings:
        """A copy whose path is absolute (Ray workers run in other directories)."""
        return self.model_copy(update={"path": str(resolve_path(self.path).resolve())})


class PromptHead(nn.Module):
    """A head that sees the prompt: ``forward(e_r (B, H), e_p (B, H)) -> (B,)`` through a one-hidden-layer MLP."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        # No bias on the output: it cancels in the Bradley-Terry loss, so it could never be trained.
        self.net = nn.Sequential(nn.Linear(4 * hidden, width), nn.GELU(), nn.Linear(width, 1, bias=False))

    def forward(self, e_r: torch.Tensor, e_p: torch.Tensor) -> torch.Tensor:
        """Scores (B,) from response and prompt embeddings (B, H)."""
        return self.net(torch.cat([e_r, e_p, e_r * e_p, (e_r - e_p).abs()], dim=-1)).squeeze(-1)


def response_head(hidden: int) -> nn.Linear:
    """A linear head on the response embedding (no bias: it cancels in the Bradley-Terry loss)."""
    head = nn.Linear(hidden, 1, bias=False)
    nn.init.normal_(head.weight, std=1.0 / (hidden**0.5))
    return head


class RewardModel(nn.Module):
    """Shared encoder + pooling + one head per criterion; ``score``/``score_all`` give rewards of responses."""

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer,
        max_length: int,
        include_prompt: bool,
        pooling: str,
        criteria: list[str] | tuple[str, ...] = (DEFAULT_CRITERION,),
        prompt_heads: list[str] | tuple[str, ...] = (),
        head_width: int = 256,
    ):
        super().__init__()
        self.encoder = encoder
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # our own pooling is used; an unused pooler would never train
        if pooling not in ("mean", "sum"):
            raise ValueError(f"reward model pooling must be 'mean' or 'sum', got {pooling!r}")
        self.pooling = pooling
        self.tokenizer = tokenizer
        self.tokenizer.truncation_side = "left"
        self.max_length = max_length
        self.include_prompt = include_prompt
        self.head_width = head_width
        self.heads = nn.ModuleDict()
        self.criteria: list[str] = []
        self.prompt_heads: set[str] = set()
        self.stats: dict[str, tuple[float, float]] = {}  # per head: (mean, std) of raw training scores
        self.add_heads(list(criteria), prompt_heads)

    def add_heads(self, criteria: list[str], prompt_heads=()) -> None:
        """Add a fresh head for each criterion not yet here (a prompt head if it is in `prompt_heads`)."""
        hidden = self.encoder.config.hidden_size
        for c in criteria:
            if c in self.heads:
                continue
            if c in prompt_heads:
                self.heads[c] = PromptHead(hidden, self.head_width)
                self.prompt_heads.add(c)
            else:
                self.heads[c] = response_head(hidden)
            self.criteria.append(c)
            self.stats[c] = (0.0, 1.0)

    def order_heads(self, first: list[str]) -> None:
        """Put `first` (existing heads) at the front of ``criteria``, the rest after in their order."""
        self.criteria = list(first) + [c for c in self.criteria if c not in first]

    @classmethod
    def untrained(cls, s: RewardModelSettings, criteria: list[str] | None = None) -> RewardModel:
        """A fresh reward model (random heads for `criteria`, else ``s.criteria`` or 'overall') on the settings' encoder."""
        encoder, tok = load_encoder(s.backbone)
        names = criteria or s.criteria or [DEFAULT_CRITERION]
        return cls(encoder, tok, s.max_length, s.include_prompt, s.pooling, names, s.prompt_heads, s.head_width)

    @property
    def head(self) -> nn.Module:
        """The first (default) head."""
        return self.heads[self.criteria[0]]

    @property
    def score_mean(self) -> float:
        """Normalisation mean of the first head."""
        return self.stats[self.criteria[0]][0]

    @score_mean.setter
    def score_mean(self, v: float) -> None:
        self.stats[self.criteria[0]] = (float(v), self.stats[self.criteria[0]][1])

    @property
    def score_std(self) -> float:
        """Normalisation std of the first head."""
        return self.stats[self.criteria[0]][1]

    @score_std.setter
    def score_std(self, v: float) -> None:
        self.stats[self.criteria[0]] = (self.stats[self.criteria[0]][0], float(v))

    def head_name(self, name: str | None) -> str:
        """The head a criterion name means (None = the first); a ValueError naming the heads if there is none."""
        if name is None:
            return self.criteria[0]
        if name not in self.heads:
            raise ValueError(f"reward model has no head {name!r} (heads: {self.criteria})")
        return name

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings (B, H) of token ids (B, T) with mask (B, T)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1)  # (B, H)
        if self.pooling == "mean":
            pooled = pooled / mask.sum(1).clamp(min=1.0)
        return pooled

    def head_scores(self, criterion: str, e_r: torch.Tensor, e_p: torch.Tensor | None = None) -> torch.Tensor:
        """Raw scores (B,) of one head from response embeddings (B, H) and, for a prompt head, prompt embeddings (B, H)."""
        if criterion in self.prompt_heads:
            if e_p is None:
                raise ValueError(f"reward-model head {criterion!r} needs the prompts of the responses")
            return self.heads[criterion](e_r, e_p)
        return self.heads[criterion](e_r).squeeze(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of the first head for token ids (B, T) with mask (B, T) (a response head)."""
        return self.head_scores(self.criteria[0], self.pool(input_ids, attention_mask))

    def texts(self, responses: list[str], prompts: list[str] | None = None) -> list[str]:
        """The strings the encoder sees for responses: the response, or prompt + response if configured."""
        if self.include_prompt and prompts is not None:
            return [f"{p} {r}" for p, r in zip(prompts, responses)]
        return list(responses)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize a batch of texts (left-truncated to max_length); an empty text becomes "." so every row has a token."""
        return self.tokenizer(
            [t if t.strip() else "." for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Pooled embeddings (N, H) of texts, `batch_size` texts per encoder pass (gradients flow if enabled)."""
        device = next(self.parameters()).device
        parts = []
        for i in range(0, len(texts), batch_size):
            enc = self.encode(texts[i : i + batch_size]).to(device)
            parts.append(self.pool(enc["input_ids"], enc["attention_mask"]))
        return torch.cat(parts) if parts else torch.zeros(0, self.encoder.config.hidden_size, device=device)

    def prompt_embeddings(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings (N, H) of each row's prompt, each distinct prompt encoded once."""
        distinct = list(dict.fromkeys(prompts))
        where = {p: i for i, p in enumerate(distinct)}
        return self.embed(distinct, batch_size)[torch.tensor([where[p] for p in prompts], dtype=torch.long)]

    @torch.no_grad()
    def score_all(
        self,
        responses: list[str],
        prompts: list[str] | None = None,
        batch_size: int = 64,
        normalize: bool = False,
        criteria: list[str] | None = None,
    ) -> dict[str, list[float]]:
        """``{criterion: [score, ...]}`` of every head (or those in `criteria`) from one encoder pass; `normalize` standardises per head."""
        names = [self.head_name(c) for c in criteria] if criteria is not None else list(self.criteria)
        if not responses:
            return {c: [] for c in names}
        if prompts is not None and len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts for {len(responses)} responses")
        was_training = self.training
        self.eval()
        e_r = self.embed(self.texts(responses, prompts), batch_size)  # (N, H)
        needs_prompt = any(c in self.prompt_heads for c in names)
        e_p = self.prompt_embeddings(prompts, batch_size) if needs_prompt and prompts is not None else None
        out = {}
        for c in names:
            s = self.head_scores(c, e_r, e_p).float()
            if normalize:
                s = (s - self.stats[c][0]) / self.stats[c][1]
            out[c] = s.tolist()
        self.train(was_training)
        return out

    def score(
        self,
        responses: list[str],
        prompts: list[str] | None = None,
        batch_size: int = 64,
        normalize: bool = False,
        criterion: str | None = None,
    ) -> list[float]:
        """Reward of each response by one head (None = the first); `normalize` standardises with its saved stats."""
        c = self.head_name(criterion)
        return self.score_all(responses, prompts, batch_size, normalize, criteria=[c])[c]

    def save(self, path: str | Path) -> Path:
        """Write the encoder, tokenizer, heads and metadata as one directory."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in self.heads.state_dict().items()}, str(out / HEAD_FILE))
        meta = {
            "max_length": self.max_length,
            "include_prompt": self.include_prompt,
            "pooling": self.pooling,
            "criteria": self.criteria,
            "prompt_heads": [c for c in self.criteria if c in self.prompt_heads],
            "head_width": self.head_width,
            "stats": {c: {"mean": m, "std": s} for c, (m, s) in self.stats.items()},
            # The first head's stats where single-head readers look for them.
            "score_mean": self.score_mean,
            "score_std": self.score_std,
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return out

    @staticmethod
    def check_dir(path: str | Path) -> Path:
        """The absolute path of a trained reward-model directory; a ModelLoadError saying what to do if it is not one."""
        p = Path(path).expanduser().resolve()
        if not (p / META_FILE).exists() or not (p / HEAD_FILE).exists():
            raise ModelLoadError(
                f"reward model {str(path)!r}: not a trained reward model directory "
                f"(no {META_FILE}); run `alignray train-rm` first"
            )
        return p

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        """Load a directory written by :meth:`save` (or by the single-head format before it); a clear error if it is not one."""
        p = cls.check_dir(path)
        meta = json.loads((p / META_FILE).read_text())
        weights = load_file(str(p / HEAD_FILE))
        if "criteria" in meta:
            criteria, stats = meta["criteria"], meta["stats"]
        else:  # one unnamed linear head: the default criterion
            criteria = [DEFAULT_CRITERION]
            stats = {DEFAULT_CRITERION: {"mean": meta["score_mean"], "std": meta["score_std"]}}
            weights = {f"{DEFAULT_CRITERION}.{k}": v for k, v in weights.items()}
        encoder, tok = load_encoder(str(p))
        rm = cls(
            encoder,
            tok,
            max_length=meta["max_length"],
            include_prompt=meta["include_prompt"],
            pooling=meta.get("pooling", "mean"),
            criteria=criteria,
            prompt_heads=meta.get("prompt_heads", []),
            head_width=meta.get("head_width", 256),
        )
        rm.heads.load_state_dict(weights)
        rm.stats = {c: (float(stats[c]["mean"]), float(stats[c]["std"]) or 1.0) for c in criteria}
        return rm.eval()
