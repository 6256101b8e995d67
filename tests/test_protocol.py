"""The dev/test protocol: selection and weight search never read the report split."""

import pytest

from soce.benchmarks import lmeval as evaluate
from soce.job.pipeline import run
from soce.job.preflight import compose_config

pytestmark = pytest.mark.slow


def test_selection_and_search_ignore_report_split(tmp_path, tiny_demo_root, monkeypatch):
    def job(name: str):
        cfg = compose_config(
            [
                "strategy=soce_weighted",
                "debug=fast",
                "selection.tau=1.0",
                "selection.max_experts=3",
                f"paths.root_dir={tmp_path / name}",
                f"demo.root={tiny_demo_root}",
                "save_soup=false",
            ]
        )
        return run(cfg, tmp_path / name / "job")

    honest = job("honest")
    original = evaluate.Evaluator.score

    def poisoned(self, model, tokenizer, split, items=None, log_samples=True):
        out = original(self, model, tokenizer, split, items, log_samples)
        if split == self.benchmark.report_split:  # report-split scores turned upside down
            out = {k: (1.0 - v if isinstance(v, float) else v) for k, v in out.items()}
        return out

    monkeypatch.setattr(evaluate.Evaluator, "score", poisoned)
    liar = job("poisoned")  # its own cache dir: nothing is served from the honest run
    assert liar.evaluated > 0 and liar.cached < liar.evaluated
    for key in ("weak_set", "experts", "expert_of", "weights", "best_single"):
        assert getattr(liar, key) == getattr(honest, key), key
    assert liar.scores["dev"] == honest.scores["dev"]
    assert liar.scores["test"]["overall"] == pytest.approx(1 - honest.scores["test"]["overall"])
