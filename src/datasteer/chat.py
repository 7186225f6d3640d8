"""Rendering prompts and training examples for a tokenizer, one way for every stage.

Generation, fine-tuning, metagradient attribution and DPG all render a prompt through `encode_prompts`
(the chat template when the tokenizer has one, else the plain text with the tokenizer's special tokens), so
a student is trained on exactly the context it is sampled from.
"""

from __future__ import annotations

from typing import Any


def chat_messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return messages


def plain_prompt(prompt: str, system_prompt: str | None) -> str:
    """A prompt for a model used without its chat template: the system prompt, a blank line, the prompt."""
    return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt


def encode_prompts(tokenizer: Any, prompts: list[str], system_prompt: str | None, chat: bool | None = None) -> Any:
    """Left-padded input ids, through the chat template when `chat` (default: when the tokenizer has one)."""
    tokenizer.padding_side = "left"
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        texts = [tokenizer.apply_chat_template(chat_messages(p, system_prompt), tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        add_special = False  # the template already wrote them
    else:
        texts = [plain_prompt(p, system_prompt) for p in prompts]
        add_special = True
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)


def tokenize_row(prompt: str, completion: str, finished: bool, tokenizer: Any, system_prompt: str | None,
                 max_length: int) -> tuple[dict[str, list[int]] | None, bool]:
    """(example with input_ids/labels or None when the prompt alone fills max_length, whether it was cut).

    The prompt goes through the chat template exactly as at generation and is masked out of the loss;
    an end-of-turn token follows only a completion that finished (not one cut at max_new_tokens).
    """
    prompt_ids = encode_prompts(tokenizer, [prompt], system_prompt)["input_ids"][0].tolist()
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if finished and tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        return None, False
    cut = len(completion_ids) > room
    completion_ids = completion_ids[:room]  # cut: the end-of-turn token goes with the cut tail
    return {"input_ids": prompt_ids + completion_ids, "labels": [-100] * len(prompt_ids) + completion_ids}, cut
