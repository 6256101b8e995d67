"""Issue 24's sweep, end to end: ``python -m soce -m merge=linear,ties strategy=soce_weighted debug=fast`` runs the
paper's search under each operator (a report row, result.json, MLflow run and soup per operator), and a
task-vector operator without a base is refused in one line before anything is written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from soce.report.tables import distinct_soups, load_results

from .conftest import soce_cmd


@pytest.mark.slow
def test_a_sweep_over_operators_searches_under_each(tmp_path, tiny_demo_root):
    common = ["debug=fast", f"paths.root_dir={tmp_path}", f"demo.root={tiny_demo_root}"]
    sweep = tmp_path / "sweep"
    args = ["-m", "merge=linear,ties", "strategy=soce_weighted", *common, f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(soce_cmd(*args), capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    results = load_results(sweep)
    assert sorted(r["merge"]["method"] for r in results) == ["linear", "ties"]
    assert sorted(r["label"] for r in distinct_soups(results)) == [
        "soce_weighted merge=linear",
        "soce_weighted merge=ties",
    ]
    (ties,) = [r for r in results if r["merge"]["method"] == "ties"]
    assert ties["merge"] == {"method": "ties", "density": 0.5, "lambda": 1.0, "normalize": True, "rescale": False}
    assert ties["base"] and ties["base"].endswith("base")  # the demo pool names its own base
    soup = Path(ties["soup_path"])
    rec = json.loads((soup / "soce_recipe.json").read_text())
    assert rec["method"] == "ties" and rec["merge"] == ties["merge"] and rec["base"]
    assert yaml.safe_load((soup.parent / "artifacts" / "recipe.yaml").read_text())["base"] == ties["base"]
    # your own pool without a base: refused in one line before anything runs or is written
    cands = sorted(p for p in (tiny_demo_root / "fast-seed0" / "candidates").iterdir() if p.is_dir())[:3]
    (tmp_path / "conf" / "pool").mkdir(parents=True)
    mine = {"name": "mine", "source": "paths", "candidates": {c.name: str(c) for c in cands}, "population": {}}
    (tmp_path / "conf" / "pool" / "mine.yaml").write_text(yaml.safe_dump(mine))
    bad = tmp_path / "bad"
    args = ["-m", "merge=linear,ties", "pool=mine", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", *common]
    args += [f"benchmark.task_dir={tiny_demo_root / 'fast-seed0' / 'tasks'}"]
    args += [f"hydra.sweep.dir={bad}"]
    p = subprocess.run(soce_cmd(*args), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "pool.base" in lines[0], p.stderr[-2000:]
    assert not bad.exists()
