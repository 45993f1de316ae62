"""The transfer benchmark: one set of engines scores a model on each variant's held-out sums."""

from __future__ import annotations

import json

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
    # Four problems in six phrasings: the first four, one problem each.
    assert list(figures["phrased"]["by_phrasing"]) == list(OTHER_PHRASINGS[:4])
    assert figures["as_trained"]["by_phrasing"].keys() == {"What is {expr}?"}
    a, b = figures["operands_100_999"]["example"].removeprefix("What is ").rstrip("?").split(" + ")
    assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999


def test_keep_reuses_recorded_models_of_the_same_settings_only(tmp_path) -> None:
    from benchmarks.arithmetic_transfer import recorded_models

    path = tmp_path / "arithmetic_transfer.json"
    args, variants = ["conf=smol", "eval.k=0"], {"as_trained": []}
    assert recorded_models(path, args, variants, 200, ["trained"]) == []  # nothing recorded
    base = {"model": "base", "figures": {"as_trained": {"greedy_accuracy": 0.46}},
            "machine": {"cpu_model": "AMD EPYC"}}
    old = {"model": "trained", "figures": {"as_trained": {"greedy_accuracy": 0.8}}, "gain": {}}
    path.write_text(json.dumps({"args": args, "variants": variants, "size": 200,
                                "models": [base, old]}))
    # The model evaluated again is left out; the gain of a kept row is recomputed, not kept.
    assert recorded_models(path, args, variants, 200, ["trained"]) == [base]
    assert recorded_models(path, args, variants, 200, ["other"]) == [
        base, {k: v for k, v in old.items() if k != "gain"}]
    with pytest.raises(SystemExit, match="recorded with other size; run without --keep"):
        recorded_models(path, args, variants, 20, ["trained"])
    with pytest.raises(SystemExit, match="other args, variants"):
        recorded_models(path, [*args, "eval.size=9"], {"phrased": []}, 200, ["trained"])
