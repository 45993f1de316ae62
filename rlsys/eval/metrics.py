"""Evaluation metrics: pure functions of per-sample correctness and final answers.

For a problem with n sampled completions of which c are correct:

    pass@1  = c / n                            (DeepSeek-R1: mean accuracy over the n samples)
    pass@k  = 1 - C(n - c, k) / C(n, k)        (Chen et al. 2021, unbiased, for k <= n)
    cons@n  = correctness of the majority answer among the n samples

and a benchmark figure is the mean over problems. No Ray, no model: the evaluator
(rlsys.eval.evaluator) collects the correctness and answers, these functions only count.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

from rlsys.rewards.rule_based import extract_answer, plain_number


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k for one problem from n samples, c of them correct.

        pass@k = 1 - C(n - c, k) / C(n, k)

    the probability that k samples drawn without replacement from the n include a correct one
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"). It is 1 when fewer
    than k samples are wrong (n - c < k). Needs 0 <= c <= n and 1 <= k <= n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    # Exact integers, one division: no float underflow in the binomials for large n.
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k of a benchmark: the mean over problems of pass_at_k(n_i, c_i, k), where
    `counts` holds each problem's (n_i samples, c_i correct)."""
    if not counts:
        raise ValueError("mean_pass_at_k: no problems")
    return math.fsum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """pass@1 as DeepSeek-R1 reports it: the mean over problems of the share of each problem's
    k samples that are correct, (1/N) sum_i c_i / k_i. Equal to mean_pass_at_k(.., 1)."""
    if not correct or any(len(samples) == 0 for samples in correct):
        raise ValueError("pass_at_1: needs at least one problem, each with a sample")
    return math.fsum(sum(samples) / len(samples) for samples in correct) / len(correct)


def pass_k_values(n: int) -> list[int]:
    """The k of the pass@k figures reported for n samples: 1, 2, 4, ... up to n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


_WHITESPACE_RE = re.compile(r"\s+")


def _canonical_number(value: Fraction) -> str:
    """A plain decimal number's value written one way: "1000", "-2.5", "0.125"."""
    if value.denominator == 1:
        return str(value.numerator)
    # A value read from a finite decimal has a denominator of 2^a 5^b: it has a finite
    # decimal expansion of max(a, b) digits.
    digits, scaled = 0, value
    while scaled.denominator != 1:
        scaled *= 10
        digits += 1
    sign = "-" if scaled < 0 else ""
    text = str(abs(scaled.numerator)).rjust(digits + 1, "0")
    return f"{sign}{text[:-digits]}.{text[-digits:]}"


def normalise_answer(response: str) -> str | None:
    """The final answer of a response in the form answers are compared in for voting.

    1. the content of the last <answer>...</answer> pair (rlsys.rewards.extract_answer);
       None when there is none or it is empty: such a completion does not vote;
    2. runs of whitespace collapsed to one space;
    3. a plain decimal number, as the accuracy reward reads one (optional sign, thousands
       separated by "," or a space, decimals, a short exponent), rewritten canonically: the
       integer or shortest decimal of its exact value, so "1,000", "1000.0", "+1000" and
       "1e3" all become "1000", "-0" becomes "0" and "2.50" becomes "2.5".
    Nothing else is rewritten: "1/2" and "0.5", or "x+1" and "1+x", are different answers.
    """
    answer = extract_answer(response)
    if not answer:
        return None
    answer = _WHITESPACE_RE.sub(" ", answer).strip()
    value = plain_number(answer)
    return _canonical_number(value) if value is not None else answer


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int | None]:
    """The most frequent answer among the samples and the index of its first occurrence.

    None answers (no final answer) do not vote; if nothing votes the result is (None, None).
    A tie goes to the tied answer that occurs first among the samples (lowest sample index),
    which keeps the vote deterministic and independent of string order.
    """
    counts = Counter(answer for answer in answers if answer is not None)  # first-seen order
    if not counts:
        return None, None
    winner = max(counts, key=counts.__getitem__)  # max keeps the first of tied answers
    return winner, answers.index(winner)


def consensus(answers: Sequence[str | None], correct: Sequence[bool]) -> tuple[str | None, bool]:
    """One problem's majority answer and whether it is correct.

    The vote is judged by the correctness of the first sample holding the winning answer (its
    accuracy reward), so a voted answer is graded exactly as a sample would be; samples holding
    the same normalised answer are graded alike by a math verifier. No vote is wrong.
    """
    if len(answers) != len(correct):
        raise ValueError(f"consensus: {len(answers)} answers but {len(correct)} correctness "
                         "values")
    winner, index = majority_vote(answers)
    return winner, index is not None and bool(correct[index])


def cons_at_k(answers: Sequence[Sequence[str | None]],
              correct: Sequence[Sequence[bool]]) -> float:
    """cons@k of a benchmark: the share of problems whose majority answer (over their k
    samples, see `consensus`) is correct."""
    if not answers or len(answers) != len(correct):
        raise ValueError("cons_at_k: needs one list of answers and of correctness per problem")
    return sum(consensus(a, c)[1] for a, c in zip(answers, correct, strict=True)) / len(answers)
