"""Turning prompts and conversations into the token ids a causal LM continues, one prompt or a padded batch."""

from __future__ import annotations

import torch


def chat_text(tokenizer, messages: list[dict[str, str]], chat_template: bool = True) -> str:
    """The model's input string for a conversation, ready for the assistant's turn.

    With the tokenizer's chat template when it has one (and ``chat_template``); otherwise a lone
    user message is its bare content and a longer conversation a plain ``role: content`` transcript.
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def prompt_ids(
    tokenizer, prompt: str, instruction: str = "", chat_template: bool = True, max_prompt_tokens: int | None = None
) -> list[int]:
    """Token ids of a prompt as one user turn (instruction + prompt), left-truncated to `max_prompt_tokens`."""
    content = f"{instruction}\n\n{prompt}" if instruction else prompt
    return chat_ids(tokenizer, [{"role": "user", "content": content}], chat_template)[-(max_prompt_tokens or 0) :]


def chat_ids(tokenizer, messages: list[dict[str, str]], chat_template: bool = True) -> list[int]:
    """Token ids of :func:`chat_text` (the template carries its own special tokens)."""
    return list(tokenizer(chat_text(tokenizer, messages, chat_template), add_special_tokens=False)["input_ids"])


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (B, T) and attention mask (B, T) of token sequences, so every row ends at the last column."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask
