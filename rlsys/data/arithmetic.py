"""The arithmetic task: procedurally generated integer arithmetic problems."""

from __future__ import annotations

import hashlib
import itertools
import random
import string
from collections.abc import Iterator

from rlsys.data.tasks import DataError, IndexedTask, Problem, RunConfig, register_task

_OPS = ("+", "-", "*")
# Up to this many distinct expressions the held-out split is chosen exactly by enumeration;
# above it, membership is a hash threshold and no enumeration is needed.
_ENUMERATE_LIMIT = 100_000
# In the hashed regime, at least this fraction of the space is held out so that finding
# eval_size held-out expressions by random draws takes a bounded number of draws (~1/fraction
# each); the training stream loses the same small fraction of its space.
_MIN_HELD_OUT_FRACTION = 0.02
#: How a problem is asked: a str.format template over the placeholders below. The default is
#: the demo's one phrasing; other phrasings ask the same held-out expressions in other words,
#: which tests whether what a model learned is the arithmetic or the wording.
DEFAULT_PHRASINGS = ("What is {expr}?",)
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
PLACEHOLDERS = {
    "expr": "the expression in symbols, 23 + 17",
    "words": "the expression in words, 23 plus 17",
    "a": "the first operand; two operands, one operator",
    "b": "the second operand; two operands, one operator",
}


def worked_steps(terms: list[int], ops: list[str]) -> tuple[list[str], int]:
    """`terms` joined by `ops` evaluated as a person would, by hand (no eval()): products
    first, left to right, then sums. Returns the steps, sentences like "4 * (-2) = -8." (none
    for a single number), and the result; the cold-start SFT data shows the steps."""

    def show(v: int) -> str:
        return f"({v})" if v < 0 else str(v)

    steps = []
    # Fold products into their left neighbour, left to right.
    folded, signs = [terms[0]], []
    for op, v in zip(ops, terms[1:], strict=True):
        if op == "*":
            product = folded[-1] * v
            steps.append(f"{show(folded[-1])} * {show(v)} = {product}.")
            folded[-1] = product
        else:
            folded.append(v)
            signs.append(op)
    total = folded[0]
    for op, v in zip(signs, folded[1:], strict=True):
        new = total + v if op == "+" else total - v
        steps.append(f"{show(total)} {op} {show(v)} = {new}.")
        total = new
    return steps, total


def check_phrasings(phrasings: object, ops: tuple[str, ...] | list[str],
                    num_terms: int) -> tuple[str, ...]:
    """`phrasings` as a tuple of templates, or a DataError naming the first bad one
    (data.arithmetic.phrasings[i]). A template is a str naming at least one placeholder of
    PLACEHOLDERS and no other field; {a} and {b} only where every problem is one `a op b`
    (else "the sum of {a} and {b}" would silently ask another question than the gold answers)."""
    key = "data.arithmetic.phrasings"
    templates = (phrasings,) if isinstance(phrasings, str) else tuple(phrasings)  # type: ignore[arg-type]
    if not templates:
        raise DataError(f"{key}: is empty; give at least one template, "
                        f"e.g. {DEFAULT_PHRASINGS[0]!r}")
    for i, phrasing in enumerate(templates):
        if not isinstance(phrasing, str):
            raise DataError(f"{key}[{i}]: must be a str template, got {type(phrasing).__name__}")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(phrasing)
                      if name is not None}
        except ValueError as exc:
            raise DataError(f"{key}[{i}]: {phrasing!r} is not a valid template ({exc}); write "
                            "a literal brace as {{ or }}") from None
        unknown = sorted(fields - PLACEHOLDERS.keys())
        if unknown or not fields:
            what = f"unknown placeholder(s) {unknown}" if unknown else "no placeholder"
            raise DataError(f"{key}[{i}]: {phrasing!r} has {what}; use "
                            + ", ".join(f"{{{n}}} ({d})" for n, d in PLACEHOLDERS.items()))
        if fields & {"a", "b"} and (num_terms != 2 or len(set(ops)) != 1):
            raise DataError(f"{key}[{i}]: {phrasing!r} names {{a}}/{{b}}, which need "
                            "data.arithmetic.num_terms=2 and one operator in "
                            f"data.arithmetic.ops (got {num_terms} terms, ops {list(ops)})")
    return templates


@register_task
class ArithmeticTask(IndexedTask):
    """Procedurally generated integer arithmetic, e.g. "What is 23 + 17?" -> "40".

    Terms are drawn uniformly from [min_value, max_value] and operators from `ops`; the answer
    follows the usual precedence (* before + and -). Division is not offered because it would
    need non-integer answers or rejection of non-divisible pairs.

    The held-out split depends only on the problem space (ops, range, num_terms, eval_size),
    not on `seed`, so runs with different seeds are evaluated on the same problems. Membership
    is decided by a stable hash of the canonical expression: for small spaces the eval set is
    exactly the `eval_size` expressions with the lowest hash; for large ones every expression
    below a hash threshold is held out and the eval set is the first `eval_size` of them in a
    fixed pseudo-random order. Training sampling rejects every held-out expression.

    `phrasings` are the templates a question is asked in ("Compute {expr}.", "What is the
    sum of {a} and {b}?"; placeholders in PLACEHOLDERS). A training draw takes one at random;
    held-out problem i is asked in phrasing i mod len(phrasings). The phrasings do not change
    which expressions are held out, so a model can be evaluated on its own held-out
    expressions asked in words it was not trained on.

    Training problems are drawn with replacement; the i-th draw is a pure function of
    (seed, i), so the sampler state is the single integer i.
    """

    name = "arithmetic"

    def __init__(
        self,
        seed: int = 0,
        ops: tuple[str, ...] | list[str] = ("+",),
        min_value: int = 1,
        max_value: int = 50,
        num_terms: int = 2,
        eval_size: int = 100,
        phrasings: tuple[str, ...] | list[str] = DEFAULT_PHRASINGS,
    ) -> None:
        self._check_ints(seed=seed, min_value=min_value, max_value=max_value,
                         num_terms=num_terms, eval_size=eval_size)
        ops = tuple(ops)  # a string ("+-" from a command line override) gives its symbols
        if not ops:
            raise DataError(f"{self._key('ops')}: is empty; choose from '+', '-', '*'")
        bad = [op for op in ops if op not in _OPS]
        if bad:
            raise DataError(f"{self._key('ops')}: unsupported op(s) {bad}; choose from '+', '-', "
                            "'*' (division is not offered: answers must be integers)")
        if len(set(ops)) != len(ops):
            raise DataError(f"{self._key('ops')}: has duplicates: {list(ops)}")
        if min_value > max_value:
            raise DataError(f"{self._key('min_value')}: {min_value} is greater than "
                            f"{self._key('max_value')}={max_value}")
        if num_terms < 2:
            raise DataError(f"{self._key('num_terms')}: must be >= 2, got {num_terms}")
        if eval_size < 0:
            raise DataError(f"{self._key('eval_size')}: must be >= 0, got {eval_size}")
        phrasings = check_phrasings(phrasings, ops, num_terms)

        self.seed = seed
        self.ops = ops
        self.min_value = min_value
        self.max_value = max_value
        self.num_terms = num_terms
        self.eval_size = eval_size
        self.phrasings = phrasings
        self.num_expressions = ((max_value - min_value + 1) ** num_terms
                                * len(ops) ** (num_terms - 1))
        # Keep at least three quarters of the space for training so held-out rejection stays
        # cheap and the training set is not a thin remainder.
        if eval_size > self.num_expressions // 4:
            raise DataError(
                f"{self._key('eval_size')}: only {self.num_expressions} distinct problems for "
                f"ops={list(ops)}, values {min_value}..{max_value}, num_terms={num_terms}; "
                f"eval_size={eval_size} may be at most a quarter of them "
                f"({self.num_expressions // 4}). Lower eval_size or widen the range.")
        # The eval split's identity: everything that defines the problem space, but not `seed`.
        self._space_tag = f"arith-v1|ops={''.join(ops)}|{min_value}..{max_value}|terms={num_terms}"
        self._held_out_exact: set[str] | None = None
        self._hash_threshold = 0
        self._eval: list[Problem] = self._build_eval()

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ArithmeticTask:
        a = cfg.data.arithmetic
        return cls(seed=cfg.trainer.seed, ops=tuple(a.ops), min_value=a.min_value,
                   max_value=a.max_value, num_terms=a.num_terms, eval_size=cfg.data.eval_size,
                   phrasings=tuple(a.phrasings))

    def _key(self, key: str) -> str:
        if key in ("ops", "min_value", "max_value", "num_terms"):
            key = f"arithmetic.{key}"
        return key if key == "seed" else super()._key(key)

    # -- expressions

    def _render(self, terms: list[int], ops: list[str]) -> str:
        parts = [str(terms[0])]
        for op, term in zip(ops, terms[1:], strict=True):
            # Parenthesise negative operands so "3 - -2" never appears.
            parts.append(f"{op} ({term})" if term < 0 else f"{op} {term}")
        return " ".join(parts)

    def _draw(self, rng: random.Random) -> tuple[list[int], list[str]]:
        terms = [rng.randint(self.min_value, self.max_value) for _ in range(self.num_terms)]
        ops = [rng.choice(self.ops) for _ in range(self.num_terms - 1)]
        return terms, ops

    def _in_words(self, terms: list[int], ops: list[str]) -> str:
        def word(v: int) -> str:
            return f"negative {-v}" if v < 0 else str(v)

        parts = [word(terms[0])]
        for op, term in zip(ops, terms[1:], strict=True):
            parts += [_OP_WORDS[op], word(term)]
        return " ".join(parts)

    def _problem(self, terms: list[int], ops: list[str], phrasing: str) -> Problem:
        """The problem `terms` joined by `ops`, asked in `phrasing`. Its id names the
        expression, not the wording: the same sum asked two ways is the same problem."""
        expr = self._render(terms, ops)
        question = phrasing.format(expr=expr, words=self._in_words(terms, ops),
                                   a=terms[0], b=terms[-1])
        return Problem(
            id=f"arith:{expr}",
            question=question,
            answer=str(worked_steps(terms, ops)[1]),
            meta={"expression": expr, "phrasing": phrasing},
            task=self.name,
        )

    def _hash(self, expr: str) -> int:
        """A 64-bit hash that is the same in every process (Python's hash() is salted per run)."""
        digest = hashlib.sha256(f"{self._space_tag}|{expr}".encode()).digest()
        return int.from_bytes(digest[:8], "big")

    def _is_held_out(self, expr: str) -> bool:
        if self._held_out_exact is not None:
            return expr in self._held_out_exact
        return self._hash(expr) < self._hash_threshold

    def _enumerate(self) -> Iterator[tuple[list[int], list[str]]]:
        values = range(self.min_value, self.max_value + 1)
        for terms in itertools.product(values, repeat=self.num_terms):
            for ops in itertools.product(self.ops, repeat=self.num_terms - 1):
                yield list(terms), list(ops)

    def _eval_phrasing(self, i: int) -> str:
        return self.phrasings[i % len(self.phrasings)]

    def _build_eval(self) -> list[Problem]:
        if self.eval_size == 0:
            self._held_out_exact = set()
            return []
        if self.num_expressions <= _ENUMERATE_LIMIT:
            ranked = sorted(
                (self._hash(self._render(t, o)), t, o) for t, o in self._enumerate()
            )[: self.eval_size]
            problems = [self._problem(t, o, self._eval_phrasing(i))
                        for i, (_, t, o) in enumerate(ranked)]
            self._held_out_exact = {p.meta["expression"] for p in problems}
            return problems
        fraction = min(0.5, max(_MIN_HELD_OUT_FRACTION, 2 * self.eval_size / self.num_expressions))
        self._hash_threshold = int(fraction * 2**64)
        rng = random.Random(f"{self._space_tag}|eval")
        found: dict[str, Problem] = {}
        # ~1/fraction draws per held-out hit; the cap only guards against a logic error.
        max_draws = 1000 * self.eval_size + 10_000
        for _ in range(max_draws):
            terms, ops = self._draw(rng)
            expr = self._render(terms, ops)
            if expr not in found and self._is_held_out(expr):
                found[expr] = self._problem(terms, ops, self._eval_phrasing(len(found)))
                if len(found) == self.eval_size:
                    return list(found.values())
        raise RuntimeError(  # pragma: no cover - statistically unreachable
            f"arithmetic task: found only {len(found)} held-out problems in {max_draws} draws"
        )

    # -- Task API

    def sample(self, n: int) -> list[Problem]:
        """Draw the next `n` training problems (with replacement, never a held-out one)."""
        out = []
        for _ in range(self._check_n(n)):
            rng = random.Random(f"arith-train|{self.seed}|{self._next_index}")
            self._next_index += 1
            while True:
                terms, ops = self._draw(rng)
                if not self._is_held_out(self._render(terms, ops)):
                    break
            # One phrasing draws nothing, so single-phrasing streams are as they always were.
            phrasing = (rng.choice(self.phrasings) if len(self.phrasings) > 1
                        else self.phrasings[0])
            out.append(self._problem(terms, ops, phrasing))
        return out
