"""soce.report.plots: every figure is written as a PNG."""

import pandas as pd

from soce.report.analyses import ShapleyResult, consistency, shapley_values
from soce.report.plots import consistency_figure, scores_figure, shapley_figure, weights_figure
from tests.test_analyses import PNG_MAGIC, _populations, interaction_game


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_figures_are_written(tmp_path):
    players = ["a", "b", "c", "d", "e"]
    _assert_png(shapley_figure(shapley_values(players, interaction_game), tmp_path / "shap_exact.png"))
    sampled = shapley_values(players, interaction_game, exact_max=0, n_permutations=20)
    _assert_png(shapley_figure(sampled, tmp_path / "sub" / "shap_sampled.png"))

    cand, soups = _populations()
    soups["flat"], cand["flat"] = 50.0, 1.0
    _assert_png(consistency_figure(consistency(cand, soups), tmp_path / "consistency.png"))

    weights = {"uniform": dict.fromkeys(players, 0.2), "soce": {"a": 0.6, "c": 0.3, "e": 0.1}}
    _assert_png(weights_figure(weights, tmp_path / "weights.png"))
    _assert_png(weights_figure({"task-arith": {"a": 1.2, "b": -0.2}}, tmp_path / "weights_neg.png"))

    table = pd.DataFrame(
        {"math": [40.0, 45.5, 44.0], "code": [30.0, 31.0, 35.5], "tools": [60.0, 60.0, 58.0]},
        index=["best single (a)", "uniform", "soce"],
    )
    table["overall"] = table.mean(axis=1)
    _assert_png(scores_figure(table, tmp_path / "scores.png"))
    _assert_png(scores_figure(table.drop(columns="overall"), tmp_path / "scores_no_overall.png"))


def test_result_type_is_exported():
    assert ShapleyResult.__name__ == "ShapleyResult"
