"""The README's "Your own benchmark", end to end: the shipped example (examples/own_benchmark: local JSONL, one
generate_until task scored by lm-eval's exact_match, one multiple_choice and one loglikelihood task scored by acc,
no process_results) on the fast demo zoo's checkpoints, three strategies, with dev/test splits and with one
split (carved into disjoint halves)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_benchmark"
STRATEGIES = {"uniform", "soce_selected", "soce_weighted"}
METRICS = {"mirror": "exact_match,none", "times4": "acc,none", "swap": "acc,none"}


def test_example_data_is_what_make_data_writes(tmp_path, monkeypatch):
    """The committed JSONL is reproducible from its script (and dev/test share no prompt)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_data", EXAMPLE / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(mod, "HERE", tmp_path)
    mod.main()
    for f in sorted((EXAMPLE / "data").glob("*.jsonl")):
        assert (tmp_path / "data" / f.name).read_text() == f.read_text(), f.name


def _sweep(tmp_path: Path, demo_root: Path, benchmark: str) -> dict[str, dict]:
    manifest = json.loads(next(Path(demo_root).glob("fast-seed0/manifest.json")).read_text())
    conf = tmp_path / "conf" / "pool"
    conf.mkdir(parents=True)  # the user's pool: the fast zoo's candidates (their own fine-tunes)
    (conf / "zoo.yaml").write_text(
        yaml.safe_dump({"name": "zoo", "source": "paths", "candidates": manifest["candidates"]})
    )
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        f"hydra.searchpath=[file://{EXAMPLE / 'conf'},file://{tmp_path / 'conf'}]",
        f"benchmark={benchmark}",
        "pool=zoo",
        "strategy=" + ",".join(sorted(STRATEGIES)),
        "selection.max_experts=3",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
    ]
    p = subprocess.run([sys.executable, "-m", "soce", *args], capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    results = {r["strategy"]: r for r in (json.loads(f.read_text()) for f in sweep.glob("*/result.json"))}
    assert set(results) == STRATEGIES
    report = (sweep / "report.md").read_text()
    for r in results.values():
        assert r["metrics"] == METRICS  # mixed metrics, none configured
        assert set(r["scores"]) == {"dev", "test"}
        assert all(0 <= v <= 1 for s in r["scores"].values() for v in s.values())
        assert r["items"]["statement"] in report
    return results | {"_log": p.stdout + p.stderr, "_report": report}


@pytest.mark.slow
def test_own_benchmark_with_dev_and_test_splits(tmp_path, tiny_demo_root):
    got = _sweep(tmp_path, tiny_demo_root, "own")
    items = got["soce_weighted"]["items"]
    assert items["mode"] == "disjoint" and items["shared"] == dict.fromkeys(METRICS, 0)
    assert items["select"] == dict.fromkeys(METRICS, 20) and items["report"] == dict.fromkeys(METRICS, 30)
    assert "carving" not in got["_log"]


@pytest.mark.slow
def test_own_benchmark_with_one_split_reports_disjoint_items(tmp_path, tiny_demo_root):
    got = _sweep(tmp_path, tiny_demo_root, "own_single")
    for strategy in STRATEGIES:
        items = got[strategy]["items"]
        assert items["mode"] == "carved" and items["source"] == "test" and items["shared"] == dict.fromkeys(METRICS, 30)
        assert all(items["select"][c] + items["report"][c] == 30 and items["select"][c] == 15 for c in METRICS)
    assert got["_log"].count("carving disjoint halves of 'test'") == len(STRATEGIES)  # one warning line per job
    assert "disjoint halves of `test`" in got["_report"]
    assert "select_split == report_split" not in got["_log"]


def test_readme_shows_the_shipped_example():
    """The README's benchmark YAML and task YAMLs are the files the end-to-end tests run (parsed equal)."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own benchmark") :]
    section = section[: section.index("\n## ", 5)]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert yaml.safe_load(blocks[0]) == yaml.safe_load((EXAMPLE / "conf" / "benchmark" / "own.yaml").read_text())
    tasks = {re.match(r"# (\S+\.yaml)", b).group(1): yaml.safe_load(b) for b in blocks[1:]}
    assert set(tasks) == {"own_mirror_dev.yaml", "own_times4_dev.yaml", "own_swap_dev.yaml"}
    for name, shown in tasks.items():
        assert shown == yaml.safe_load((EXAMPLE / "tasks" / name).read_text()), name
    assert {t["output_type"] for t in tasks.values()} == {"generate_until", "multiple_choice", "loglikelihood"}
