"""Prompt templates: turning a question into the text the policy continues.

Two styles:
- "r1_zero": the plain-text template of the DeepSeek-R1 paper (R1-Zero), for base models.
- "chat": the tokenizer's own chat template with a system prompt asking for the R1 tag format,
  for instruct models.

`response_prefix` (e.g. "<think>\\n") is appended after the prompt so the model starts inside
the think block; the reward functions must then score `response_prefix + completion`, because
the prefix is part of the response the format reward checks.
"""

from __future__ import annotations

from typing import Any

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {question}. Assistant:"
)

_CHAT_INSTRUCTIONS = (
    "You are a helpful assistant that solves problems step by step. First think through the "
    "reasoning inside <think> </think> tags, then give the final answer inside <answer> "
    "</answer> tags, i.e. <think> reasoning here </think> <answer> answer here </answer>. "
    "Write nothing after the closing </answer> tag. When the answer is a number, put only the "
    "number inside the answer tags, with no units or words."
)

# The example is deliberately a word problem rather than "What is a + b?": an arithmetic example
# could coincide with a held-out arithmetic eval problem and leak its answer into every prompt.
_WORKED_EXAMPLE = (
    "\n\nExample:\n"
    "Question: A box holds 3 rows of 4 eggs. How many eggs are in 2 such boxes?\n"
    "Response: <think> One box holds 3 * 4 = 12 eggs, so 2 boxes hold 2 * 12 = 24 eggs. "
    "</think> <answer>24</answer>"
)


def make_system_prompt(few_shot: bool = False) -> str:
    """The chat system prompt; `few_shot=True` appends one short worked example.

    A worked example matters for small instruct models: without one they rarely use the tags
    at all, so a strict format reward gives no learning signal (FACTS.md).
    """
    return _CHAT_INSTRUCTIONS + (_WORKED_EXAMPLE if few_shot else "")


CHAT_SYSTEM_PROMPT = make_system_prompt(few_shot=False)
CHAT_SYSTEM_PROMPT_FEW_SHOT = make_system_prompt(few_shot=True)

TEMPLATES = ("r1_zero", "chat")


def render_prompt(
    question: str,
    template: str,
    tokenizer: Any = None,
    system_prompt: str | None = None,
    response_prefix: str = "",
) -> str:
    """Render `question` into prompt text ending where the model's response begins.

    template "r1_zero": R1_ZERO_TEMPLATE with the question; `tokenizer` is not needed and
    `system_prompt` must be None (the template has its own instructions).
    template "chat": `tokenizer.apply_chat_template` over [system, user] with the generation
    prompt; `system_prompt` None means CHAT_SYSTEM_PROMPT and "" means no system message
    (for chat templates that reject the system role).
    `response_prefix` is appended in both cases.
    """
    if not isinstance(question, str):
        raise TypeError(f"render_prompt: question must be a str, got {type(question).__name__}")
    if template == "r1_zero":
        if system_prompt is not None:
            raise ValueError(
                "render_prompt: system_prompt is only used by template 'chat'; the r1_zero "
                "template carries its own instructions (leave system_prompt unset)"
            )
        # str.format only interprets braces in the template, so braces in the question are safe.
        return R1_ZERO_TEMPLATE.format(question=question) + response_prefix
    if template == "chat":
        if tokenizer is None:
            raise ValueError(
                "render_prompt: template 'chat' needs a tokenizer with a chat template; "
                "use data.template=r1_zero for base models"
            )
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(
                f"render_prompt: template 'chat' needs a tokenizer with a chat template, but "
                f"{name} has none (tokenizer.chat_template is empty); "
                "use data.template=r1_zero for base models"
            )
        system = CHAT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(
                "render_prompt: tokenizer.apply_chat_template(tokenize=False) returned "
                f"{type(text).__name__}, expected str"
            )
        return text + response_prefix
    raise ValueError(f"render_prompt: unknown template {template!r}; available: {TEMPLATES}")
