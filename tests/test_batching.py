"""The batch plan on its own (no Ray): DESIGN.md 'Batch strategies', properties 1-4."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from rayhybrid.batching import BatchPlan, BatchPlanError, units_from
from rayhybrid.config import BatchConfig
from rayhybrid.datamodel import Pair, ParallelItem

LANGS = ("ar", "de", "en", "es", "zh")


def items(n: int, langs=LANGS, prefix: str = "q") -> list[ParallelItem]:
    return [
        ParallelItem(
            f"{prefix}{i}",
            {lang: f"question {i} in {lang}" for lang in langs},
            {lang: (f"passage {i} in {lang}",) for lang in langs},
        )
        for i in range(n)
    ]


def plan_of(units_items=(), pairs=(), workers: int = 1, **kw) -> BatchPlan:
    return BatchPlan(BatchConfig(**kw), units_from(units_items, pairs), num_workers=workers)


def chi_square(counts: Counter, keys, probs) -> float:
    n = sum(counts[k] for k in keys)
    expected = np.asarray(probs) * n
    observed = np.asarray([counts[k] for k in keys], dtype=float)
    return float(((observed - expected) ** 2 / expected).sum())


# 0.999 quantiles of chi-square with df degrees of freedom: a correct sampler fails 1 in 1000.
CHI2_999 = {2: 13.82, 3: 16.27, 5: 20.52}


def test_hybrid_share_of_mono_steps_converges_to_alpha():
    plan = plan_of(items(300), strategy="hybrid", alpha=0.3, batch_size=8)
    modes = Counter(plan.step(g)[0].mode for g in range(2000))
    assert set(modes) == {"mono", "cross"}
    assert abs(modes["mono"] / 2000 - 0.3) <= 0.03
    # The cheap mode lookup agrees with the full plan.
    assert all(plan.mode_of(g) == plan.step(g)[0].mode for g in range(200))


@pytest.mark.parametrize(("alpha", "only"), [(0.0, "cross"), (1.0, "mono")])
def test_hybrid_extremes(alpha, only):
    plan = plan_of(items(100), strategy="hybrid", alpha=alpha, batch_size=8)
    assert {plan.mode_of(g) for g in range(300)} == {only}


def test_mono_cross_and_group_properties_on_every_step():
    plan = plan_of(items(300), strategy="hybrid", alpha=0.5, batch_size=16, workers=2)
    seen_modes = set()
    for g in range(500):
        rows = plan.step(g)
        assert [r.slot for r in rows] == list(range(16))
        assert len({r.mode for r in rows}) == 1
        mode = rows[0].mode
        seen_modes.add(mode)
        if mode == "mono":
            assert len({r.query_lang for r in rows} | {r.passage_lang for r in rows}) == 1
        else:
            assert all(r.query_lang != r.passage_lang for r in rows)
        assert len({r.group for r in rows}) == len(rows), f"group repeated at step {g}"
    assert seen_modes == {"mono", "cross"}


def test_no_group_twice_when_pairs_share_groups():
    # Three pairs per group (en-en, de-de, en-de): taking two of one group would be a false negative.
    pairs = [
        Pair(f"q{g} {a}", f"p{g} {b}", a, b, group=f"g{g}")
        for g in range(40)
        for a, b in (("en", "en"), ("de", "de"), ("en", "de"))
    ]
    for strategy in ("mixed", "cross", "hybrid"):
        plan = plan_of(pairs=pairs, strategy=strategy, batch_size=20, alpha=0.5)
        for g in range(200):
            rows = plan.step(g)
            assert len({r.group for r in rows}) == 20, (strategy, g)


def test_plan_is_pure_function_of_seed_epoch_step():
    a = plan_of(items(200), batch_size=8, seed=7, steps_per_epoch=10)
    b = plan_of(items(200), batch_size=8, seed=7, steps_per_epoch=10)
    # Computed in a different order (b jumps straight to epoch 3) and still identical.
    assert b.step(35) == a.step(35)
    assert [a.step(g) for g in range(40)] == [b.step(g) for g in range(40)]
    c = plan_of(items(200), batch_size=8, seed=8, steps_per_epoch=10)
    assert [c.step(g) for g in range(10)] != [a.step(g) for g in range(10)]
    assert a.locate(35) == (3, 5)


def test_restart_at_step_k_yields_the_same_rows():
    full = list(plan_of(items(100), batch_size=8, workers=2).rows(0, 60, rank=1))
    resumed = list(plan_of(items(100), batch_size=8, workers=2).rows(23, 60, rank=1))
    assert resumed == full[23 * 4 :]


def test_worker_shares_follow_one_plan():
    plan = plan_of(items(200), strategy="hybrid", batch_size=12, workers=3)
    for g in range(100):
        shares = [plan.worker_rows(g, r) for r in range(3)]
        assert [row for share in shares for row in share] == plan.step(g)
        assert all(len(s) == 4 for s in shares)
        assert len({s[0].mode for s in shares}) == 1
        if shares[0][0].mode == "mono":
            assert len({r.query_lang for s in shares for r in s}) == 1
    with pytest.raises(ValueError, match="rank"):
        plan.worker_rows(0, 3)


def test_per_epoch_shuffle_uses_each_unit_once():
    plan = plan_of(items(100), strategy="hybrid", batch_size=10)
    assert plan.steps_per_epoch == 10
    epochs = [[r.unit for r in plan.rows(e * 10, (e + 1) * 10)] for e in range(3)]
    for units in epochs:
        assert sorted(units) == list(range(100))
    assert epochs[0] != epochs[1] != epochs[2]


def test_small_language_is_reused_but_never_twice_in_a_batch():
    # 'fr' has 10 units; drawn uniformly it runs out within an epoch and is recycled.
    pairs = [Pair(f"q{i}", f"p{i}", "en", "en", f"en{i}") for i in range(300)]
    pairs += [Pair(f"q{i}", f"p{i}", "fr", "fr", f"fr{i}") for i in range(10)]
    plan = plan_of(pairs=pairs, strategy="mono", batch_size=10)
    fr_steps = [
        plan.step(g) for g in range(plan.steps_per_epoch) if plan.step(g)[0].query_lang == "fr"
    ]
    assert len(fr_steps) >= 2
    for rows in fr_steps:
        assert len({r.group for r in rows}) == 10


def test_mixed_and_english_strategies():
    plan = plan_of(items(100), strategy="mixed", batch_size=16)
    langs_per_batch = []
    for g in range(50):
        rows = plan.step(g)
        assert all(r.mode == "mixed" and r.query_lang == r.passage_lang for r in rows)
        langs_per_batch.append(len({r.query_lang for r in rows}))
    assert max(langs_per_batch) > 1
    plan = plan_of(items(100), strategy="english", batch_size=16)
    assert {(r.mode, r.query_lang, r.passage_lang) for r in plan.rows(0, 30)} == {
        ("english", "en", "en")
    }


def unbalanced_pairs() -> list[Pair]:
    sizes = {"en": 400, "de": 100, "fr": 25}
    return [
        Pair(f"q{i}", f"p{i}", lang, lang, f"{lang}{i}")
        for lang, n in sizes.items()
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("sampling", "temperature", "expected"),
    [
        ("uniform", 1.0, {"de": 1 / 3, "en": 1 / 3, "fr": 1 / 3}),
        ("temperature", 1.0, {"de": 100 / 525, "en": 400 / 525, "fr": 25 / 525}),
        ("temperature", 2.0, {"de": 10 / 35, "en": 20 / 35, "fr": 5 / 35}),
    ],
)
def test_mono_languages_follow_sampling_weights(sampling, temperature, expected):
    plan = plan_of(
        pairs=unbalanced_pairs(),
        strategy="mono",
        batch_size=8,
        language_sampling=sampling,
        temperature=temperature,
    )
    assert dict(zip([k[0] for k in plan.mono_keys], plan.mono_weights)) == pytest.approx(expected)
    counts = Counter(plan.step(g)[0].query_lang for g in range(3000))
    keys = sorted(expected)
    assert chi_square(counts, keys, [expected[k] for k in keys]) < CHI2_999[2], counts


@pytest.mark.parametrize("sampling", ["uniform", "temperature"])
def test_cross_language_pairs_follow_sampling_weights(sampling):
    # Partly parallel data (like MLQA-R): pairs allowed only where an item has both languages.
    data = (
        items(300, ("en", "de", "fr"), "a")
        + items(300, ("en", "de"), "b")
        + items(100, ("en", "fr"), "c")
    )
    plan = plan_of(
        data, strategy="cross", batch_size=8, language_sampling=sampling, temperature=1.0
    )
    n = {
        ("de", "en"): 600,
        ("en", "de"): 600,
        ("en", "fr"): 400,
        ("fr", "en"): 400,
        ("de", "fr"): 300,
        ("fr", "de"): 300,
    }
    assert sorted(plan.cross_keys) == sorted(n)
    assert all(plan.key_count(k) == v for k, v in n.items())
    keys = sorted(n)
    probs = [1 / 6] * 6 if sampling == "uniform" else [n[k] / sum(n.values()) for k in keys]
    counts = Counter((r.query_lang, r.passage_lang) for r in plan.rows(0, 1500))
    assert chi_square(counts, keys, probs) < CHI2_999[5], counts


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(BatchPlanError, match=r"batch\.alpha.*\[0, 1\]"):
        plan_of(items(50), alpha=alpha, batch_size=8)


@pytest.mark.parametrize("strategy", ["cross", "hybrid"])
def test_cross_strategies_need_two_languages(strategy):
    single = items(50, ("de",))
    with pytest.raises(BatchPlanError, match=r"batch\.strategy.*single language \['de'\]"):
        plan_of(single, strategy=strategy, alpha=0.5, batch_size=8)
    # hybrid with alpha = 1 is purely monolingual and fine on one language.
    assert plan_of(single, strategy="hybrid", alpha=1.0, batch_size=8).mode_of(0) == "mono"


def test_batch_size_larger_than_a_language_supplies():
    with pytest.raises(BatchPlanError, match=r"batch\.batch_size=32.*language 'fr'.*25 units"):
        plan_of(pairs=unbalanced_pairs(), strategy="mono", batch_size=32)
    with pytest.raises(BatchPlanError, match=r"batch\.batch_size=64 .*50 distinct groups"):
        plan_of(items(50), strategy="cross", batch_size=64)
    with pytest.raises(BatchPlanError, match=r"batch\.batch_size=600 .*525 distinct groups"):
        plan_of(pairs=unbalanced_pairs(), strategy="mixed", batch_size=600)


def test_english_needs_english_data_and_batch_divides_by_workers():
    with pytest.raises(BatchPlanError, match="english.*en-en"):
        plan_of(items(50, ("de", "fr")), strategy="english", batch_size=8)
    with pytest.raises(BatchPlanError, match=r"batch_size=10 must divide by train\.num_workers=3"):
        plan_of(items(50), batch_size=10, workers=3)
    with pytest.raises(BatchPlanError, match="no usable pairs"):
        plan_of([], batch_size=8)
    with pytest.raises(BatchPlanError, match=r"batch\.temperature"):
        plan_of(items(50), batch_size=8, language_sampling="temperature", temperature=0.0)
