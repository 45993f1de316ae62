"""The reasoning_gym task: problems from reasoning-gym's procedural generators."""

from __future__ import annotations

from typing import Any

from rlsys.data.tasks import (
    DataError,
    IndexedTask,
    Problem,
    RunConfig,
    normalize_question,
    register_task,
)


@register_task
class ReasoningGymTask(IndexedTask):
    """Problems from one of reasoning-gym's procedural generators (chain_sum, basic_arithmetic,
    gsm_symbolic, ...), each with a gold answer string.

    Generators are indexable: problem i of a seed is a pure function of (seed, i), so the
    sampler state is one counter. The held-out split comes from a seed of its own (the same for
    every run seed, so runs are compared on the same problems), and training draws skip any
    question that is also held out.
    """

    name = "reasoning_gym"
    _EVAL_SEED = 1_000_003
    _INDEX_SPACE = 2**40  # reasoning-gym datasets index lazily; size only bounds the index

    def __init__(self, dataset: str, seed: int = 0, eval_size: int = 100,
                 options: dict[str, Any] | None = None) -> None:
        import reasoning_gym

        self.dataset = dataset
        self.seed = seed
        where = self._key("reasoning_gym")
        try:
            self._train = reasoning_gym.create_dataset(dataset, seed=seed,
                                                       size=self._INDEX_SPACE, **(options or {}))
            held_out = reasoning_gym.create_dataset(dataset, seed=self._EVAL_SEED,
                                                    size=eval_size, **(options or {}))
        except ValueError as exc:
            from reasoning_gym.factory import DATASETS

            raise DataError(f"{where}.dataset={dataset!r}: {exc}; {len(DATASETS)} available, "
                            f"e.g. {', '.join(sorted(DATASETS)[:6])}") from None
        except TypeError as exc:
            raise DataError(f"{where}.options: {exc}") from None
        self._eval = [self._problem(f"eval-{i}", item) for i, item in enumerate(held_out)]
        self._held_out = {normalize_question(p.question) for p in self._eval}

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ReasoningGymTask:
        rg = cfg.data.reasoning_gym
        return cls(dataset=rg.dataset, seed=cfg.trainer.seed, eval_size=cfg.data.eval_size,
                   options=dict(rg.options))

    def _problem(self, pid: str, item: dict[str, Any]) -> Problem:
        answer = str(item["answer"])
        if item["metadata"].get("source_dataset") == "codeio":
            answer = _codeio_gold(item)
        return Problem(id=f"{self.dataset}-{pid}", question=item["question"], answer=answer,
                       meta={"dataset": self.dataset}, task=self.name)

    def sample(self, n: int) -> list[Problem]:
        out: list[Problem] = []
        while len(out) < self._check_n(n):
            index, self._next_index = self._next_index, self._next_index + 1
            item = self._train[index]
            if normalize_question(item["question"]) not in self._held_out:
                out.append(self._problem(f"train-{self.seed}-{index}", item))
        return out


# The line of reasoning-gym's codeio prompts after which the reference code follows.
_CODEIO_TIP = "Tip: Here is a reference code snippet for this question."


def _codeio_gold(item: dict[str, Any]) -> str:
    """A codeio item's gold for the executing verifier: reasoning-gym's own answer is the one
    input its generator drew, while any input giving the same output is right."""
    from rlsys.rewards.codeio import codeio_gold

    question, meta = item["question"], item["metadata"]
    _, found, tail = question.partition(_CODEIO_TIP)
    if not found:
        raise DataError("reasoning_gym codeio: the prompt no longer carries the reference code "
                        f"after {_CODEIO_TIP!r}; this reasoning-gym version is not supported")
    code = tail.split("\n", 1)[1].strip()
    mode = "output" if "Given the following input:" in question else "input"
    return codeio_gold(mode, code, meta["input_data"], meta["output_data"])
