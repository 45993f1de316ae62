"""A reward model: scores (prompt, response) pairs with a Hugging Face model.

R1's all-scenario RL stage rewards general prompts (writing, open questions, ...) that have no
checkable answer with a model of human preference. `ModelScorer` loads such a model once and
scores a batch of pairs; the reward workers (actors/reward.py) serve it as the `preference`
reward part, configured by `reward.model`. Two kinds:

* ``classifier``: an ``AutoModelForSequenceClassification`` reward model. The pair is rendered
  with the tokenizer's chat template as ``[user: prompt, assistant: response]`` (plain
  ``"prompt\\n\\nresponse"`` when the tokenizer has none), and with z the logit of output
  ``label`` (0 for the usual 1-output reward model) the score is

      sigmoid(z) = 1 / (1 + exp(-z))        normalize="sigmoid" (default): in (0, 1), the
                                            Bradley-Terry probability of beating a response
                                            scored 0, on the scale of the 0/1 rule rewards
      softmax(logits)[label]                normalize="softmax": for multi-class models
      z                                     normalize="none": the raw logit

* ``judge``: an ``AutoModelForCausalLM`` asked a question about the pair. The judge template
  (default :data:`DEFAULT_JUDGE_TEMPLATE`, with ``{prompt}`` and ``{response}`` filled in) is
  the user turn of a chat ending in the assistant's turn (plain text + ``"\\nAnswer:"`` when the
  tokenizer has no chat template), and from the next-token logits l the score is

      P(yes) = sum_{t in Y} exp(l_t) / (sum_{t in Y} exp(l_t) + sum_{t in N} exp(l_t))

  where Y are the first tokens of "Yes" and " Yes", N those of "No" and " No" (duplicates
  merged; both spellings count because whether the answer starts with a space depends on the
  template). A spelling that is one token is exactly that token; one split into several is
  represented by its first token; a first token of both a yes and a no spelling (e.g. a lone
  space on a small vocabulary) is dropped from both sets, and if either set ends up empty the
  scorer refuses the model (ModelScorerError). SmolLM2: Y = {"Yes", "ĠYes"}, N = {"No", "ĠNo"}.

Inputs longer than `max_length` tokens lose the end of the response first (the question and the
chat template's closing tokens, where a classifier pools and a judge answers, are kept); if the
prompt alone is still too long, the input's beginning is cut.

Batches of `batch_size` run under ``torch.no_grad`` with right padding: a real token attends
to real tokens only, so a pair's score does not depend on what it is batched with (up to float
rounding). Runs on `device` (CPU by default) in `dtype` (float32 or bfloat16); scores are
computed in float32.

A pure leaf: torch and transformers, no Ray. They are imported when a scorer is built, so the
config can import this module cheaply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KINDS = ("classifier", "judge")
NORMALIZE = ("sigmoid", "softmax", "none")
DTYPES = ("float32", "bfloat16")

DEFAULT_JUDGE_TEMPLATE = (
    "Here is a request and a response to it.\n\n"
    "Request:\n{prompt}\n\n"
    "Response:\n{response}\n\n"
    "Is the response helpful and correct? Answer Yes or No."
)

_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")


class ModelScorerError(ValueError):
    """A reward model that cannot be loaded or used as configured; the message says why."""


def render_judge_prompt(template: str, prompt: str, response: str) -> str:
    """`template` with {prompt} and {response} replaced in one pass (braces inside the texts,
    or anything else in the template, are left alone)."""
    values = {"prompt": prompt, "response": response}
    return _PLACEHOLDER.sub(lambda m: values[m[1]], template)


class ModelScorer:
    """Loads a reward model once; `score(prompts, responses)` returns one float per pair.

    `path` is a Hugging Face folder or a built-in name of rlsys.models (built into
    `cache_dir`; those are causal LMs, so kind="judge"). See the module docstring for the
    formulas.
    """

    def __init__(self, path: str, kind: str = "classifier", *, label: int = 0,
                 normalize: str = "sigmoid", judge_template: str | None = None,
                 max_length: int = 1024, batch_size: int = 8, dtype: str = "float32",
                 device: str = "cpu", cache_dir: str | None = None) -> None:
        if kind not in KINDS:
            raise ModelScorerError(f"reward model kind must be one of {', '.join(KINDS)}, "
                                   f"got {kind!r}")
        if normalize not in NORMALIZE:
            raise ModelScorerError(f"reward model normalize must be one of "
                                   f"{', '.join(NORMALIZE)}, got {normalize!r}")
        if dtype not in DTYPES:
            raise ModelScorerError(f"reward model dtype must be one of {', '.join(DTYPES)}, "
                                   f"got {dtype!r}")
        if max_length < 8 or batch_size < 1:
            raise ModelScorerError(f"reward model needs max_length >= 8 and batch_size >= 1, "
                                   f"got {max_length} and {batch_size}")
        template = DEFAULT_JUDGE_TEMPLATE if judge_template is None else judge_template
        if kind == "judge" and "{response}" not in template:
            raise ModelScorerError("the judge template must contain {response}")

        import torch
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        self.kind, self.label, self.normalize = kind, label, normalize
        self.judge_template = template
        self.max_length, self.batch_size = max_length, batch_size
        self.device = torch.device(device)
        folder = _model_folder(path, cache_dir)
        self.path = str(folder)
        if kind == "classifier":
            _check_classifier(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            # Right padding is masked out and ignored in pooling, so any known token will do.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        cls = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
        self.model = cls.from_pretrained(folder, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        if self.model.config.pad_token_id is None:
            # Sequence classifiers pool at the last token that is not padding; they refuse
            # batches without a pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if kind == "classifier":
            num_labels = self.model.config.num_labels
            if not 0 <= label < num_labels:
                raise ModelScorerError(f"reward model {self.path} has {num_labels} output(s); "
                                       f"label {label} does not exist")
            self.yes_ids: list[int] = []
            self.no_ids: list[int] = []
        else:
            yes = self._first_token_ids(("Yes", " Yes"))
            no = self._first_token_ids(("No", " No"))
            # A first token both answers share (a lone space on a small vocabulary) says
            # nothing about the answer: drop it from both.
            self.yes_ids = [t for t in yes if t not in no]
            self.no_ids = [t for t in no if t not in yes]
            if not self.yes_ids or not self.no_ids:
                raise ModelScorerError(f"the tokenizer of {self.path} cannot tell 'Yes' from "
                                       "'No' by their first token")

    # --- rendering ------------------------------------------------------------------------

    def _first_token_ids(self, spellings: Sequence[str]) -> list[int]:
        ids: list[int] = []
        for text in spellings:
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokens and tokens[0] not in ids:
                ids.append(tokens[0])
        if not ids:
            raise ModelScorerError(f"the tokenizer of {self.path} encodes {spellings[0]!r} "
                                   "to nothing")
        return ids

    def render(self, prompt: str, response: str) -> str:
        """The model's input text for one pair (before truncation)."""
        if self.kind == "classifier":
            if self.chat:
                return self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": response}], tokenize=False)
            return f"{prompt}\n\n{response}"
        question = render_judge_prompt(self.judge_template, prompt, response)
        if self.chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False,
                add_generation_prompt=True)
        return f"{question}\nAnswer:"

    def _encode(self, text: str) -> list[int]:
        # A chat template writes its own special tokens (BOS included where the model has one).
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    def encode(self, prompt: str, response: str) -> list[int]:
        """Token ids of one pair, at most `max_length`: the end of the response goes first."""
        ids = self._encode(self.render(prompt, response))
        if len(ids) <= self.max_length:
            return ids
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        keep = len(response_ids)
        for _ in range(4):  # decode/re-encode can merge tokens differently: shrink until it fits
            keep = max(0, keep - (len(ids) - self.max_length))
            cut = self.tokenizer.decode(response_ids[:keep])
            ids = self._encode(self.render(prompt, cut))
            if len(ids) <= self.max_length or keep == 0:
                break
        # The prompt alone is too long (or re-encoding did not converge): keep the end.
        return ids[-self.max_length:]

    # --- scoring --------------------------------------------------------------------------

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response) pair, in order (see the module docstring)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            out += self._score_batch([self.encode(p, r) for p, r in
                                      zip(prompts[start:stop], responses[start:stop],
                                          strict=True)])
        return out

    def _score_batch(self, batch: list[list[int]]) -> list[float]:
        import torch

        padded = self.tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
        input_ids = padded["input_ids"].to(self.device)
        mask = padded["attention_mask"].to(self.device)
        lengths = torch.tensor([len(ids) for ids in batch], device=self.device)
        with torch.no_grad():
            if self.kind == "classifier":
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
                if self.normalize == "softmax":
                    values = torch.softmax(logits, dim=-1)[:, self.label]
                elif self.normalize == "sigmoid":
                    values = torch.sigmoid(logits[:, self.label])
                else:
                    values = logits[:, self.label]
            else:
                values = self._p_yes(input_ids, mask, lengths - 1)
        return [float(v) for v in values.cpu()]

    def _p_yes(self, input_ids: Any, mask: Any, last: Any) -> Any:
        import torch

        # Only the logits after each pair's last token are needed; logits_to_keep (an index
        # tensor) avoids a batch x length x vocabulary tensor on models that support it.
        positions, index = torch.unique(last, return_inverse=True)
        try:
            logits = self.model(input_ids=input_ids, attention_mask=mask,
                                logits_to_keep=positions).logits
            rows = logits[torch.arange(len(last), device=logits.device), index]
        except TypeError:  # a model without logits_to_keep
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            rows = logits[torch.arange(len(last), device=logits.device), last]
        rows = rows.float()
        yes = torch.logsumexp(rows[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(rows[:, self.no_ids], dim=-1)
        return torch.sigmoid(yes - no)  # = e^yes / (e^yes + e^no)


def _model_folder(path: str, cache_dir: str | None) -> Path:
    """A local HF folder: `path` itself when it holds config.json, else a built-in name."""
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return folder
    from rlsys.models import ModelError, resolve_model

    try:
        return resolve_model(path, cache_dir)
    except ModelError as exc:
        raise ModelScorerError(f"reward.model.path: {str(exc).replace('model.path=', '')}") \
            from None


def _check_classifier(folder: Path) -> None:
    # A causal LM loads into AutoModelForSequenceClassification with a freshly initialised
    # (random) score head: that would be a silent random reward.
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures")
    except (OSError, ValueError) as exc:
        raise ModelScorerError(f"reward model {folder}: cannot read config.json ({exc})") from None
    if architectures and not any("SequenceClassification" in a for a in architectures):
        raise ModelScorerError(
            f"reward model {folder} is a {', '.join(architectures)}, not a sequence "
            "classifier: use reward.model.kind=judge for a causal LM")

