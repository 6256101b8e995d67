"""Every entry behaves: --help is quick and harmless, report alone shows the latest sweep, collect refuses an
unfinished sweep."""

import json
import os
import subprocess
import sys
import time

import pytest

ENTRIES = ("soce", "soce.report", "soce.merge", "soce.sweep", "soce.collect")


@pytest.mark.parametrize("entry", ENTRIES)
def test_help_exits_0_quickly_without_side_effects(entry, tmp_path):
    """`python -m <entry> --help` prints its usage and exits 0 within 2 s, writing nothing (soce.sweep --help
    used to start building the demo zoo)."""
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", entry, "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "SOCE_ROOT": str(tmp_path)},
        timeout=60,
    )
    seconds = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usage" in p.stdout.lower() or "python -m" in p.stdout
    assert list(tmp_path.iterdir()) == []  # no outputs/, no multirun/, no zoo
    assert seconds < 2, f"{entry} --help took {seconds:.2f} s"


def _sweep(uri: str, tmp_path, experiment: str) -> str:
    from soce.tracking.runs import start_run
    from soce.tracking.store import ensure_experiment, log_values

    exp = ensure_experiment(uri, experiment, str(tmp_path / "art"))
    parent = start_run(uri, exp, "sweep", tags={"soce.kind": "sweep", "soce.varying": '["strategy"]'})
    run = start_run(uri, exp, "uniform", parent, {"soce.kind": "job", "soce.label": "uniform"})
    log_values(uri, run, {"strategy": "uniform", "categories": "a"}, {"test.a": 0.5, "test.overall": 0.5})
    time.sleep(0.05)  # start_time has millisecond resolution
    return parent


def test_report_alone_shows_the_latest_sweep_of_any_experiment(tmp_path, capsys):
    from soce.report.cli import main

    db = tmp_path / "outputs" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    _sweep(uri, tmp_path, "soce-demo")
    mine = _sweep(uri, tmp_path, "soce-mine")  # a user's own benchmark, swept after the demo
    assert main([f"root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert f"MLflow sweep {mine}, experiment soce-mine (the most recent sweep of any experiment" in out
    assert main([f"root={tmp_path}", "experiment=soce-demo"]) == 0
    assert "experiment soce-demo" in capsys.readouterr().out


def test_collect_refuses_an_unfinished_sweep_unless_partial(tmp_path, monkeypatch):
    from soce import sweep

    points = [[0.5, 0.5], [0.2, 0.8], [0.8, 0.2]]
    (tmp_path / sweep.POINTS).write_text(json.dumps({"experts": ["a", "b"], "points": points}))
    result = {"select_split": "dev", "weights": {"a": 0.5, "b": 0.5}, "scores": {"dev": {"overall": 0.4}}}
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "result.json").write_text(json.dumps(result))
    assert sweep.collect_main([f"dir={tmp_path}"]) == 2
    with pytest.raises(sweep.CollectError, match=r"is unfinished: 2 of 3 points have no result .*partial=true"):
        sweep.collect(tmp_path, [])
    ran = []

    def fake_run(cmd, check):  # the final job: writes final/result.json
        ran.append(cmd)
        (tmp_path / "final").mkdir()
        (tmp_path / "final" / "result.json").write_text(
            json.dumps({**result, "scores": {"dev": {"overall": 0.4}, "test": {"overall": 0.3}}})
        )

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert sweep.collect_main([f"dir={tmp_path}", "partial=true"]) == 0
    assert ran and "strategy.weights=[0.5,0.5]" in ran[0]
    assert sweep.missing_points(tmp_path, 1) == 2


def test_a_soup_of_one_expert_says_so_in_its_log_line_and_report():
    from soce.report.tables import collapse_note, format_answer

    r = {
        "strategy": "soce_weighted",
        "weights": {"a": 1.0, "b": 0.0},
        "scores": {},
        "weak_set": ["x", "y"],
        "expert_of": {"x": "a", "y": "a"},
    }
    assert "the soup collapsed to one model: every category in L picks a" in format_answer(r)
    assert collapse_note({**r, "strategy": "best_single"}) == ""  # one model by design
    assert collapse_note({**r, "weights": {"a": 0.5, "b": 0.5}}) == ""
