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
    """Token ids of a prompt as one user turn (instruction + prompt) in at most `max_prompt_tokens` tokens.

    A prompt too long loses its first words, never the chat template or the instruction, so the
    model always sees a well-formed turn ending in the most recent words of the prompt.
    """
    words = prompt.split(" ")
    for start in range(len(words)):
        text = " ".join(words[start:])
        content = f"{instruction}\n\n{text}" if instruction else text
        ids = chat_ids(tokenizer, [{"role": "user", "content": content}], chat_template)
        if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
            return ids
    return ids[-max_prompt_tokens:]  # the template and instruction alone are over the budget


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
