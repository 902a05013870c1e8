"""Example formats: which columns a dataset row has, and how it becomes token ids and labels.

Recognised by columns, as PEFT/TRL, axolotl and LLaMA-Factory name them (``docs/data.md``):

* ``messages``: a chat, ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` (OpenAI / TRL);
* ``conversations``: ShareGPT, ``[{"from": "human"|"gpt"|"system", "value": str}, ...]``;
* ``instruction``, ``output`` (optional ``input``, ``system``): Alpaca;
* ``prompt``, ``completion``: loss on the completion (raw text, or as one chat turn with ``chat_template``);
* ``text``: loss on every token.

Chats (the first three) go through the tokenizer's own chat template (``apply_chat_template``) and the
loss is on the assistant turns only: each turn's characters are found as the difference between the
rendered conversation up to the turn with and without it, and tokens starting inside those spans are the
labels (the template's end-of-turn token included, so the model learns to stop).
"""
from __future__ import annotations

from typing import Optional

FORMATS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
           "prompt_completion": ("prompt", "completion"), "text": ("text",)}
CHAT = ("messages", "sharegpt", "alpaca")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


def detect(columns) -> Optional[str]:
    """The format a set of column names is in (the first match of :data:`FORMATS`), or None."""
    cols = set(columns)
    return next((f for f, need in FORMATS.items() if set(need) <= cols), None)


def describe_formats() -> str:
    return "; ".join(f"{f}: {' + '.join(need)}" for f, need in FORMATS.items())


def to_messages(row: dict, fmt: str) -> list[dict]:
    """A chat row as ``messages`` (pure; :func:`check_row` has validated it)."""
    if fmt == "messages":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if fmt == "sharegpt":
        return [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]]
    if fmt == "alpaca":
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return system + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    if fmt == "prompt_completion":
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"].strip()}]
    raise ValueError(f"format {fmt!r} is not a chat")


def _check_turns(turns, key: str, role_key: str, text_key: str, allowed) -> Optional[str]:
    if not isinstance(turns, list) or not turns:
        return f"{key!r} must be a non-empty list of turns"
    for j, m in enumerate(turns):
        if not isinstance(m, dict) or not isinstance(m.get(text_key), str):
            return f"{key}[{j}] must be an object with a string {text_key!r}"
        if m.get(role_key) not in allowed:
            return f"{key}[{j}].{role_key} is {m.get(role_key)!r}; allowed: {sorted(allowed)}"
    if not any((SHAREGPT_ROLES.get(m[role_key]) if key == "conversations" else m[role_key]) == "assistant" for m in turns):
        return f"{key!r} has no assistant turn to learn from"
    return None


def row_problem(row: dict, fmt: str) -> Optional[str]:
    """What is wrong with one row of a ``fmt`` dataset (None: it is usable)."""
    if fmt == "messages":
        return _check_turns(row.get("messages"), "messages", "role", "content", ROLES)
    if fmt == "sharegpt":
        return _check_turns(row.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    for key in FORMATS[fmt]:
        v = row.get(key)
        if not isinstance(v, str) or (key not in ("prompt", "instruction") and not v):
            got = "missing" if v is None else f"{type(v).__name__} {v!r}"[:80]
            return f"{key!r} must be a non-empty string, got {got}"
    if fmt == "alpaca" and row.get("input") is not None and not isinstance(row["input"], str):
        return f"'input' must be a string, got {type(row['input']).__name__}"
    return None


def encode_chat(messages: list[dict], tok, max_length: int) -> dict:
    """Token ids of the templated chat and labels on its assistant turns (module docstring); cut at
    ``max_length`` from the end, as TRL does for conversations."""
    render = lambda ms, gen=False: tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before, through = render(messages[:i], True) if i else "", render(messages[:i + 1])
            if not (text.startswith(through) and through.startswith(before)):
                raise ValueError("the tokenizer's chat template renders a conversation differently from its beginning; "
                                 "assistant turns cannot be located (use prompt/completion rows instead)")
            spans.append((len(before), len(through)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [t if any(a <= off[0] < b for a, b in spans) else -100
              for t, off in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids, "labels": labels}


class PromptStyle:
    """How a prompt is put before the model and which text its label starts with: raw (the prompt as is,
    the completion's first token) or through the chat template (the prompt as a user turn, the model's
    answer after the assistant header). Shared by training and the held-out accuracy, so both see one style."""

    def __init__(self, tok, chat: bool):
        self.tok, self.chat = tok, chat

    def prompt_ids(self, prompt: str) -> list[int]:
        if not self.chat:
            return self.tok(prompt, add_special_tokens=True)["input_ids"]
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def label_text(self, completion: str) -> str:
        return completion.strip() if self.chat else completion
