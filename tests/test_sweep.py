"""soce.sweep: the weight grid spread over Hydra jobs (the end-to-end sweep is in tests/test_scale.py)."""

import subprocess
import sys

from soce.sweep import point_overrides


def test_point_overrides_make_one_job_per_point():
    ov = point_overrides(["a", "b"], [(0.7, 0.3), (0.5, 0.5)])
    assert ov == [
        "strategy=fixed",
        "strategy.ingredients=[a,b]",
        "strategy.weights=[0.7,0.3],[0.5,0.5]",
        "save_soup=false",
        "report=false",
    ]


def test_sweep_refuses_a_search_it_cannot_spread(tmp_path):
    """soce.sweep always grid-searched, whatever `search` said: it now refuses other searches in one line."""
    p = subprocess.run(
        [sys.executable, "-m", "soce.sweep", "search=optuna", f"paths.root_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soce.sweep: error: ") and "search=optuna" in lines[0]
    assert not (tmp_path / "outputs").exists()
