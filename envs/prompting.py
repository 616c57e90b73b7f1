"""Turning a raw prompt into the token ids the policy continues (chat template for instruct models)."""

from __future__ import annotations


def prompt_text(tokenizer, prompt: str, instruction: str = "", chat_template: bool = True) -> str:
    """The policy's input string: the user turn (instruction + prompt) in the chat template, if any."""
    content = f"{instruction}\n\n{prompt}" if instruction else prompt
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content


def prompt_ids(tokenizer, prompt: str, instruction: str = "", chat_template: bool = True,
               max_prompt_tokens: int = 64) -> list[int]:
    """Token ids of the policy's input, left-truncated to `max_prompt_tokens`."""
    text = prompt_text(tokenizer, prompt, instruction, chat_template)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids[-max_prompt_tokens:])
