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

CHAT_SYSTEM_PROMPT = (
    "Think step by step inside <think> </think> tags, then give only the final answer inside "
    "<answer> </answer> tags."
)

# Worked examples given as earlier turns of the conversation. Small instruct models copy the
# shape of previous assistant turns far more reliably than they follow written instructions:
# measured on SmolLM2-135M-Instruct over 32 arithmetic problems, the strict format reward went
# from 0.00 (instructions plus an example inside the system prompt) to 1.00 greedy / 0.81 at
# temperature 1 with these two turns. The operands have three digits so that they cannot be
# held-out problems of the default arithmetic task (operands up to 50) leaking into every prompt.
FEW_SHOT_TURNS: tuple[tuple[str, str], ...] = (
    ("What is 317 + 205?", "<think>\n317 + 205 = 522\n</think>\n<answer>522</answer>"),
    ("What is 128 + 764?", "<think>\n128 + 764 = 892\n</think>\n<answer>892</answer>"),
)


TEMPLATES = ("r1_zero", "chat")


def render_prompt(
    question: str,
    template: str,
    tokenizer: Any = None,
    system_prompt: str | None = None,
    response_prefix: str = "",
    few_shot: bool = False,
) -> str:
    """Render `question` into prompt text ending where the model's response begins.

    template "r1_zero": R1_ZERO_TEMPLATE with the question; `tokenizer` is not needed and
    `system_prompt` must be None (the template has its own instructions).
    template "chat": `tokenizer.apply_chat_template` over [system, user] with the generation
    prompt; `system_prompt` None means CHAT_SYSTEM_PROMPT and "" means no system message
    (for chat templates that reject the system role). `few_shot=True` inserts FEW_SHOT_TURNS
    as earlier user/assistant turns (chat only).
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
        if few_shot:
            raise ValueError("render_prompt: few_shot is only used by template 'chat'")
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
        for question_shot, answer_shot in FEW_SHOT_TURNS if few_shot else ():
            messages += [{"role": "user", "content": question_shot},
                         {"role": "assistant", "content": answer_shot}]
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(
                "render_prompt: tokenizer.apply_chat_template(tokenize=False) returned "
                f"{type(text).__name__}, expected str"
            )
        return text + response_prefix
    raise ValueError(f"render_prompt: unknown template {template!r}; available: {TEMPLATES}")
