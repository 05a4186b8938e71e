"""The re-ranking benchmark's selection proxy (benchmarks/rerank.py): folds and the selection rule."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "rerank.py"
    spec = importlib.util.spec_from_file_location("rerank_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # importlib's recipe: dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_nested_folds_hold_every_train_class_out_once_and_never_train_on_it(bench):
    labels = np.repeat(np.arange(20), 3)  # 12 train classes, 8 validation classes, 3 images each
    split = np.where(labels < 12, "train", "validation")
    df = pd.DataFrame({"label": labels, "split": split, "is_query": split == "validation"})
    df["is_gallery"] = df["is_query"]
    train_classes = set(range(12))
    held_out = []
    for fold in range(4):
        inner = bench.nested_frame(df, seed=3, fold=fold)
        held = inner[inner["split"] == "validation"]
        assert set(inner["label"]) == train_classes  # validation classes never enter the proxy
        assert not set(held["label"]) & set(inner.loc[inner["split"] == "train", "label"])
        assert held["is_query"].all() and held["is_gallery"].all()
        held_out.append(set(held["label"]))
    assert sorted(c for group in held_out for c in group) == sorted(train_classes)


def test_selection_table_averages_folds_per_seed_then_applies_the_rule(bench):
    rows = []
    for seed, per_fold in ((0, (0.01, 0.03)), (1, (0.02, 0.04)), (2, (0.0, 0.02))):
        for fold, gain in enumerate(per_fold):
            for name in ("figures", "photo"):
                rows.append(
                    {"dataset": name, "seed": seed, "fold": fold, "candidate": "a", "gain cmc@1": gain,
                     "gain map@5": gain + (0.01 if name == "photo" else 0.0), "gain precision@5": 0.0}
                )  # fmt: skip
    table = bench.selection_table(pd.DataFrame(rows))
    # per-seed means 0.02, 0.03, 0.01 on figures: mean 0.02, std 0.01 -> 0.02 - 2 * 0.01 = 0
    assert table.loc[0, "figures cmc@1"] == "+0.0200 ± 0.0100"
    assert table.loc[0, "photo map@5"] == "+0.0300 ± 0.0100"
    assert table.loc[0, "min(mean - 2 std)"] == pytest.approx(0.0, abs=1e-9)


def test_depth_choice_refuses_a_steadier_candidate_whose_mean_gain_shrinks(bench):
    ref, summed, agree10, top10 = bench.DEPTH_REFERENCE, *bench.DEPTH_CANDIDATES
    # per-seed gains (seeds 0-2, same on both datasets and metrics); two folds of equal gain per seed
    gains = {
        ref: (0.01, 0.03, 0.02),  # mean 0.02, std 0.01 -> criterion 0.0
        summed: (0.0, 0.04, 0.02),  # mean 0.02, std 0.02 -> -0.02: eligible, worse
        agree10: (0.018, 0.019, 0.020),  # mean 0.019 < 0.02: not eligible although its criterion is 0.017
        top10: (0.02, 0.04, 0.03),  # mean 0.03, std 0.01 -> 0.01: eligible, wins
        "features": (0.05, 0.05, 0.05),  # not a candidate of the round
    }
    rows = [
        {"dataset": name, "seed": seed, "fold": fold, "candidate": label, "gain cmc@1": g, "gain map@5": g}
        for label, per_seed in gains.items()
        for seed, g in enumerate(per_seed)
        for fold in (0, 1)
        for name in ("figures", "photo")
    ]
    winner, table = bench.depth_choice(pd.DataFrame(rows))
    assert winner == top10
    verdict = table.set_index("candidate")
    assert "features" not in verdict.index
    assert verdict.loc[ref, "criterion"] == pytest.approx(0.0, abs=1e-9)
    assert verdict.loc[agree10, "criterion"] == pytest.approx(0.017, abs=1e-9)
    assert verdict["eligible"].to_dict() == {ref: True, summed: True, agree10: False, top10: True}
    without_top10 = pd.DataFrame([r for r in rows if r["candidate"] != top10])
    assert bench.depth_choice(without_top10)[0] == ref  # the ineligible best criterion does not win


def test_pass_epochs_draws_about_one_list_per_train_image(bench):
    assert [bench.pass_epochs(n) for n in (40, 480, 640, 1056)] == [1, 6, 8, 13]
    assert np.isclose(bench.pass_epochs(1056, queries_per_step=4), 26)


def test_tables_joins_saved_runs_and_refuses_a_row_given_twice(bench, tmp_path, capsys):
    def run(seeds, path, map5=0.02):
        rows = [
            {"dataset": "figures", "seed": s, "fold": 0, "candidate": "a", "gain cmc@1": 0.01 * (s + 1),
             "gain map@5": map5, "gain precision@5": 0.0}
            for s in seeds
        ]  # fmt: skip
        pd.DataFrame(rows).to_csv(path, index=False)
        return str(path)

    first, second = run([0, 1], tmp_path / "a.csv"), run([2], tmp_path / "b.csv")
    assert bench.main(["--tables", first, second]) == 0
    out = capsys.readouterr().out
    assert "+0.0200 ± 0.0100" in out  # cmc@1 over seeds 0-2: 0.01, 0.02, 0.03
    table = bench.selection_table(bench.saved_rows([first, second]))
    assert table.loc[0, "min(mean - 2 std)"] == pytest.approx(0.0, abs=1e-9)  # 0.02 - 2 * 0.01
    again = bench.saved_rows([first, second, run([1], tmp_path / "same.csv")])  # a recomputed, equal row
    assert len(again) == 3 and again.equals(bench.saved_rows([first, second]))
    with pytest.raises(SystemExit, match="1 rows given twice"):
        bench.main(["--tables", first, run([1], tmp_path / "c.csv", map5=0.03)])


def test_the_eleventh_rounds_rule_reads_its_candidates_joined_with_the_tenth_rounds_reference(
    bench, tmp_path, capsys
):
    ref, copies, copies_agree, *_ = bench.DEPTH_REFERENCE, *bench.COPIES_CANDIDATES
    gains = {ref: (0.01, 0.03, 0.02), copies: (0.02, 0.04, 0.03), copies_agree: (0.0, 0.05, 0.01)}
    rows = [
        {"dataset": name, "seed": seed, "fold": 0, "candidate": label, "gain cmc@1": g, "gain map@5": g,
         "gain precision@5": 0.0}
        for label, per_seed in gains.items()
        for seed, g in enumerate(per_seed)
        for name in ("figures", "photo")
    ]  # fmt: skip
    frame = pd.DataFrame(rows)
    tenth, eleventh = tmp_path / "tenth.csv", tmp_path / "eleventh.csv"
    frame[frame["candidate"] == ref].to_csv(tenth, index=False)
    frame[frame["candidate"] != ref].to_csv(eleventh, index=False)
    winner, table = bench.depth_choice(frame, candidates=bench.COPIES_CANDIDATES)
    assert winner == copies  # mean 0.03, std 0.01 -> 0.01 beats the reference's 0.0
    assert table.set_index("candidate")["eligible"].to_dict() == {ref: True, copies: True, copies_agree: True}
    assert bench.main(["--tables", str(tenth), str(eleventh)]) == 0  # the eleventh round's other rows absent
    assert "eleventh" not in capsys.readouterr().out
    for label in bench.COPIES_CANDIDATES[2:]:
        extra = frame[frame["candidate"] == ref].assign(candidate=label)
        frame = pd.concat([frame, extra])
    frame[frame["candidate"] != ref].to_csv(eleventh, index=False)
    assert bench.main(["--tables", str(tenth), str(eleventh)]) == 0
    verdict = f"the eleventh round's rule over figures, photo (eligible: mean gains >= {ref!r}'s): {copies!r}"
    assert verdict in capsys.readouterr().out
