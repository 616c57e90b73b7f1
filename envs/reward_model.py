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

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from policies.models import ModelLoadError, load_encoder

META_FILE = "alignray_reward.json"
HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    """Encoder + pooling + linear head: ``forward(input_ids, attention_mask) -> (B,)`` scores."""

    def __init__(self, encoder: nn.Module, tokenizer, max_length: int = 96, include_prompt: bool = False,
                 pooling: str = "mean"):
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
    def from_backbone(cls, spec: str, max_length: int = 96, include_prompt: bool = False,
                      pooling: str = "mean") -> "RewardModel":
        """A fresh (untrained head) reward model on an encoder spec ('minilm', 'tiny', a directory)."""
        encoder, tok = load_encoder(spec)
        return cls(encoder, tok, max_length=max_length, include_prompt=include_prompt, pooling=pooling)

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
        """Tokenize a batch of texts (left-truncated to max_length)."""
        return self.tokenizer(
            [t if t.strip() else "." for t in texts], padding=True, truncation=True,
            max_length=self.max_length, return_tensors="pt",
        )

    @torch.no_grad()
    def score(self, responses: list[str], prompts: list[str] | None = None, batch_size: int = 64,
              normalize: bool = False) -> list[float]:
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
        meta = {"max_length": self.max_length, "include_prompt": self.include_prompt, "pooling": self.pooling,
                "score_mean": self.score_mean, "score_std": self.score_std}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, path: str | Path) -> "RewardModel":
        """Load a directory written by :meth:`save`; a clear error if it is not one."""
        p = Path(path)
        if not (p / META_FILE).exists() or not (p / HEAD_FILE).exists():
            raise ModelLoadError(
                f"reward model {str(p)!r}: not a trained reward model directory (no {META_FILE}); "
                "run `alignray train-rm` first"
            )
        meta = json.loads((p / META_FILE).read_text())
        encoder, tok = load_encoder(str(p))
        rm = cls(encoder, tok, max_length=meta["max_length"], include_prompt=meta["include_prompt"],
                 pooling=meta.get("pooling", "mean"))
        rm.head.load_state_dict(load_file(str(p / HEAD_FILE)))
        rm.score_mean, rm.score_std = float(meta["score_mean"]), float(meta["score_std"]) or 1.0
        return rm.eval()
