"""The transfer benchmark: one set of engines scores a model on each variant's held-out sums."""

from __future__ import annotations

import pytest

from benchmarks.arithmetic_transfer import OTHER_PHRASINGS, VARIANTS, evaluate_variants
from rlsys.config import load_config


def test_every_variant_is_a_valid_config() -> None:
    for name, overrides in VARIANTS.items():
        a = load_config(["conf=smol", *overrides]).data.arithmetic
        assert (a.phrasings == list(OTHER_PHRASINGS)) == ("phrased" in name), name
        assert (a.min_value, a.max_value) == {"operands_51_99": (51, 99),
                                              "operands_100_999": (100, 999),
                                              "phrased_51_99": (51, 99)}.get(name, (1, 50))


@pytest.mark.timeout(300)
def test_variants_ask_other_questions_of_one_engine(ray_cluster) -> None:
    variants = {name: VARIANTS[name] for name in ("as_trained", "phrased", "operands_100_999")}
    figures = evaluate_variants(["conf=tiny", "eval.k=0"], "tiny-random", variants, 4)
    assert list(figures) == list(variants)
    for fig in figures.values():
        assert fig["problems"] == 4 and fig["skipped_overlong"] == 0
        assert 0.0 <= fig["greedy_accuracy"] <= 1.0 and fig["format"] is not None
    # Held-out problem 0 is asked in the first phrasing: the trained one, or the first other.
    assert figures["as_trained"]["example"].startswith("What is ")
    first_other = OTHER_PHRASINGS[0].split("{")[0]
    assert figures["phrased"]["example"].startswith(first_other)
    a, b = figures["operands_100_999"]["example"].removeprefix("What is ").rstrip("?").split(" + ")
    assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999
