"""python -m soce.merge: argument parsing, one-line errors with exit status 2, a real merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from soce.merge import UsageError, main, parse_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def pair(tmp_path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    out = []
    for n in ("m1", "m2"):
        d = tmp_path / n
        d.mkdir()
        save_file({"w": torch.randn(8, 4).to(torch.bfloat16)}, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "from": n}))
        out.append(d)
    return out[0], out[1]


def test_parse_args():
    kw = parse_args(
        [
            "output=o",
            "models=[a/x,b/x/]",
            "weights=[0.25, 0.75]",
            "donor=1",
            "overwrite=true",
            "max_shard_size=1000",
            "dtype=float32",
        ]
    )
    assert kw["models"] == {"x": "a/x", "x-2": "b/x/"} and kw["weights"] == {"x": 0.25, "x-2": 0.75}
    assert kw["donor"] == "x-2" and kw["overwrite"] is True and kw["max_shard_size"] == 1000
    kw = parse_args(["output=o", "models=['a','b']", "weights=[1,2]", "names=[p,q]", "normalize=false"])
    assert kw["models"] == {"p": "a", "q": "b"} and kw["normalize"] is False
    for bad, msg in (
        (["models=[a]", "weights=[1]"], "missing output"),
        (["output=o", "models=[a,b]", "weights=[1]"], "1 weights for 2 models"),
        (["output=o", "models=a", "weights=[1]"], "expected a list"),
        (["output=o", "models=[a]", "weights=[x]"], "weights"),
        (["output=o", "models=[a]", "weights=[1]", "bogus=1"], "unknown argument"),
        (["output=o", "models=[a]", "weights=[1]", "overwrite=maybe"], "true or false"),
    ):
        with pytest.raises(UsageError, match=msg):
            parse_args(bad)


def test_main_merges_and_errors(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "soup"
    assert main([f"output={out}", f"models=[{a},{b}]", "weights=[0.5,0.5]", "donor=m2"]) == 0
    assert json.loads((out / "config.json").read_text())["from"] == "m2"
    assert "strategy" in (out / "README.md").read_text()
    capsys.readouterr()
    assert main([f"output={out}", f"models=[{a},{b}]", "weights=[0.5,0.5]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("soce.merge: error:") and "exists" in err and err.count("\n") == 1
    assert main([f"output={tmp_path / 'x'}", f"models=[{a},{b}]", "weights=[-1,2]"]) == 2
    assert "negative" in capsys.readouterr().err


def test_subprocess_exit_status(pair, tmp_path):
    a, b = pair
    cmd = [
        sys.executable,
        "-m",
        "soce.merge",
        f"output={tmp_path / 'o'}",
        f"models=[{a},{tmp_path / 'nope'}]",
        "weights=[0.5,0.5]",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    cmd[4] = f"models=[{a},{b}]"
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and Path(r.stdout.strip()).is_dir(), r.stderr


def test_rescaled_weights_are_said_once(pair, tmp_path, capsys):
    a, b = pair
    assert main([f"output={tmp_path / 'o1'}", f"models=[{a},{b}]", "weights=[3,1]"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "weights sum to 4, not 1: each was divided by that sum" in err
    assert main([f"output={tmp_path / 'o2'}", f"models=[{a},{b}]", "weights=[0.75,0.25]"]) == 0
    assert "warning" not in capsys.readouterr().err
