"""The learned reward model: a text encoder, token pooling, and a scalar head.

Pooling is ``mean`` (the encoder's own sentence embedding) or ``sum``: a sum keeps the evidence
of a few strongly worded tokens from being diluted by the length of the text, which suits
lexicon-like preferences (sentiment) where one "wonderful" counts the same in a long answer.

Saved as a Hugging Face directory: the encoder's ``save_pretrained`` files and tokenizer, plus
``reward_head.safetensors`` (the head) and ``alignray_reward.json`` (max length, whether the
prompt is scored, and the score mean/std measured on the training data for normalisation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from envs.data import resolve_path
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
    """Preference pairs per optimizer step (a prompt's comparisons stay together; each response is encoded once)."""
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate (peak; linear warm-up over the first 10% of steps, then linear decay)."""
    max_length: int = Field(96, ge=8)
    """Tokens per text fed to the encoder (prompt + response), truncated from the left."""
    include_prompt: bool = False
    """Score prompt + response instead of the response alone."""
    pooling: Literal["mean", "sum"] = "mean"
    """How token states become one vector: 'mean', or 'sum' (strong words are not diluted by length)."""
    max_pairs: int = Field(0, ge=0)
    """Train on only the first N pairs (0 = all)."""
    score_batch_size: int = Field(64, ge=1)
    """Texts per forward pass when scoring."""

    def resolved(self) -> RewardModelSettings:
        """A copy whose path is absolute (Ray workers run in other directories)."""
        return self.model_copy(update={"path": str(resolve_path(self.path).resolve())})


class RewardModel(nn.Module):
    """Encoder + pooling + linear head: ``forward(input_ids, attention_mask) -> (B,)`` scores."""

    def __init__(self, encoder: nn.Module, tokenizer, max_length: int, include_prompt: bool, pooling: str):
        super().__init__()
        self.encoder = encoder
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # our own pooling is used; an unused pooler would never train
        if pooling not in ("mean", "sum"):
            raise ValueError(f"reward model pooling must be 'mean' or 'sum', got {pooling!r}")
        self.pooling = pooling
        self.tokenizer = tokenizer
        self.tokenizer.truncation_side = "left"
        # No bias: it cancels in the Bradley-Terry loss, so it could never be trained.
        self.head = nn.Linear(encoder.config.hidden_size, 1, bias=False)
        nn.init.normal_(self.head.weight, std=1.0 / (encoder.config.hidden_size**0.5))
        self.max_length = max_length
        self.include_prompt = include_prompt
        self.score_mean, self.score_std = 0.0, 1.0

    @classmethod
    def untrained(cls, s: RewardModelSettings) -> RewardModel:
        """A fresh reward model (random head) on the settings' encoder backbone."""
        encoder, tok = load_encoder(s.backbone)
        return cls(encoder, tok, max_length=s.max_length, include_prompt=s.include_prompt, pooling=s.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores (B,) for token ids (B, T) with mask (B, T)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1)  # (B, H)
        if self.pooling == "mean":
            pooled = pooled / mask.sum(1).clamp(min=1.0)
        return self.head(pooled).squeeze(-1)

    def texts(self, responses: list[str], prompts: list[str] | None = None) -> list[str]:
        """The strings the encoder sees: the response, or prompt + response if configured."""
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

    @torch.no_grad()
    def score(
        self, responses: list[str], prompts: list[str] | None = None, batch_size: int = 64, normalize: bool = False
    ) -> list[float]:
        """Reward of each response (batched internally); `normalize` standardises with the saved stats."""
        was_training = self.training
        self.eval()
        out: list[float] = []
        texts = self.texts(responses, prompts)
        for i in range(0, len(texts), batch_size):
            batch = self.encode(texts[i : i + batch_size]).to(self.head.weight.device)
            out += self(batch["input_ids"], batch["attention_mask"]).float().tolist()
        self.train(was_training)
        if normalize:
            out = [(s - self.score_mean) / self.score_std for s in out]
        return out

    def save(self, path: str | Path) -> Path:
        """Write the encoder, tokenizer, head and metadata as one directory."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(out / HEAD_FILE))
        meta = {
            "max_length": self.max_length,
            "include_prompt": self.include_prompt,
            "pooling": self.pooling,
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
        """Load a directory written by :meth:`save`; a clear error if it is not one."""
        p = cls.check_dir(path)
        meta = json.loads((p / META_FILE).read_text())
        encoder, tok = load_encoder(str(p))
        rm = cls(
            encoder,
            tok,
            max_length=meta["max_length"],
            include_prompt=meta["include_prompt"],
            pooling=meta.get("pooling", "mean"),
        )
        rm.head.load_state_dict(load_file(str(p / HEAD_FILE)))
        rm.score_mean, rm.score_std = float(meta["score_mean"]), float(meta["score_std"]) or 1.0
        return rm.eval()
