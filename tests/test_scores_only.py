"""Scores only: experts picked from a hand-made CSV, with no model files and no network."""

import json
import subprocess

import pandas as pd
import pytest

from soce.benchmarks.scores import read_score_csv
from soce.config import ConfigError

from .conftest import soce_cmd

# two families: (x1, x2) move together, (y1, y2) move together, weakly across
ROWS = {  # corr(x, y) = -0.21 across these six models
    "alpha": [80, 78, 60, 62],
    "beta": [30, 32, 85, 83],
    "gamma": [60, 61, 20, 22],
    "delta": [50, 49, 45, 44],
    "eps": [40, 42, 30, 29],
    "zeta": [70, 69, 50, 53],
}


def write_csv(path, rows=ROWS, extra=""):
    lines = ["model,x1,x2,y1,y2"] + [f"{m},{','.join(map(str, v))}" for m, v in rows.items()]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def run_csv(tmp_path, csv, *args, run="run"):
    """``python -m soce pool=from_csv pool.csv=<csv> strategy=soce_selected <args>`` in ``tmp_path``, output
    in ``tmp_path/<run>``: the completed process."""
    return subprocess.run(
        soce_cmd(
            "pool=from_csv",
            f"pool.csv={csv}",
            "strategy=soce_selected",
            *args,
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / run}",
        ),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )


def test_scores_only_selection_one_command(tmp_path):
    csv = write_csv(tmp_path / "scores.csv")
    p = run_csv(tmp_path, csv)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    assert r["experts"] == ["alpha", "beta"]  # best on x-family and y-family
    assert r["weights"]["alpha"] == pytest.approx(0.5) and r["weights"]["gamma"] == 0.0
    assert set(r["weak_set"]) == {"x1", "x2", "y1", "y2"}
    assert r["correlation"]["x1"]["x2"] > 0.9 and r["evaluated"] == 0
    assert not list((tmp_path / "outputs").glob("demo*"))  # no demo zoo, no model touched


def test_csv_percent_and_path_column(tmp_path):
    t, paths = read_score_csv(write_csv(tmp_path / "s.csv"))
    assert t.loc["alpha", "x1"] == pytest.approx(0.8) and paths == {}
    f = tmp_path / "p.csv"
    f.write_text("model,a,b,path\nm1,0.1,0.2,/ckpt/m1\nm2,0.3,0.4,\n")
    t, paths = read_score_csv(f)
    assert list(t.columns) == ["a", "b"] and paths == {"m1": "/ckpt/m1"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model,a,b\nm1,0.1,\nm2,0.2,0.3\n", "missing score for model 'm1', category 'b'"),
        ("model,a,b\nm1,0.1,x\nm2,0.2,0.3\n", "non-numeric score 'x'"),
        ("model,a,b\nm1,0.1,0.2\nm1,0.2,0.3\n", "model 'm1' appears twice"),
    ],
)
def test_csv_bad_cells_one_clear_error(tmp_path, text, needle):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        read_score_csv(f)


def test_csv_error_from_the_command_line_is_one_line(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("model,a,b\nm1,0.1,x\nm2,0.2,0.3\nm3,0.5,0.5\n")
    p = run_csv(tmp_path, f)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "non-numeric score 'x'" in lines[0], p.stderr
    assert not (tmp_path / "run" / "result.json").exists()


def test_population_csv_drives_the_correlation(tmp_path):
    cands = write_csv(tmp_path / "c.csv", {k: ROWS[k] for k in ("alpha", "beta", "gamma")})
    pop = pd.DataFrame(ROWS, index=["x1", "x2", "y1", "y2"]).T
    pop.index.name = "model"
    pop.to_csv(tmp_path / "pop.csv")
    p = run_csv(tmp_path, cands, f"selection.population_csv={tmp_path / 'pop.csv'}")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    assert r["experts"] == ["alpha", "beta"]


def test_a_leaderboard_in_percent_selects_and_finishes(tmp_path):
    """The public BFCL v3 leaderboard's shape (percent; weak models at 0.0 and 0.5) selects experts end to end."""
    from .test_scores import leaderboard

    f = tmp_path / "lb.csv"
    f.write_text(leaderboard())
    p = run_csv(tmp_path, f)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    assert r["experts"] and max(r["candidate_scores"]["Model-0 (Prompt)"]["dev"].values()) < 1


@pytest.mark.parametrize(
    ("text", "args", "needle"),
    [
        ("model,a,b,c\nm1,0.3,0.5,55\nm2,0.7,0.4,70\nm3,0.5,0.6,60\n", [], "column 'a' holds only values <= 1"),
        (
            "model,half,quad\nm1,0.3,0.5\nm2,0.7,0.4\nm3,0.5,0.6\n",
            ["benchmark.categories=[half,quad,tri]"],
            "no column for benchmark category 'tri'",
        ),
    ],
)
def test_a_table_that_cannot_mean_what_it_says_is_refused_before_anything_is_written(tmp_path, text, args, needle):
    f = tmp_path / "t.csv"
    f.write_text(text)
    p = run_csv(tmp_path, f, *args)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_score_tables_of_one_benchmark_share_its_experiment(tmp_path):
    """A table whose columns are a known benchmark's categories (conf/benchmark) is that benchmark, whatever the
    file is called: its runs go to that benchmark's experiment, not one experiment per file."""
    import mlflow

    from soce.benchmarks.bfcl import CATEGORIES

    names = list(ROWS)
    for stem in ("leaderboard_may", "leaderboard_june"):
        lines = ["model," + ",".join(CATEGORIES)]
        lines += [f"{m}," + ",".join(str(ROWS[m][i % 4] + (i % 3)) for i in range(len(CATEGORIES))) for m in names]
        f = tmp_path / f"{stem}.csv"
        f.write_text("\n".join(lines) + "\n")
        p = run_csv(tmp_path, f, run=stem)
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads((tmp_path / stem / "result.json").read_text())["benchmark"] == "bfcl_v3"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    exps = [e.name for e in mlflow.search_experiments()]
    assert "soce-bfcl_v3" in exps and not [e for e in exps if "leaderboard" in e], exps
    jobs = mlflow.search_runs(experiment_names=["soce-bfcl_v3"], filter_string="tags.`soce.kind` = 'job'")
    assert len(jobs) == 2  # both tables' jobs, in the one experiment
