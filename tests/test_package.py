"""soce as a real package: a non-editable install (conf/ inside it) runs from an unrelated directory."""

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def test_installed_package_runs_the_demo_from_anywhere(tmp_path, tiny_demo_root):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(target),
        str(ROOT),
    ]
    subprocess.run(pip, check=True, capture_output=True, timeout=600)
    assert (target / "soce" / "conf" / "config.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, not the source tree
    code = "import soce, soce.config as p; print(soce.__file__); print(p.CONF_DIR)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert out.stdout.splitlines() == [str(target / "soce" / "__init__.py"), str(target / "soce" / "conf")]
    job = [
        sys.executable,
        "-m",
        "soce",
        "strategy=soce_selected",
        "debug=fast",
        f"demo.root={tiny_demo_root}",
        "save_soup=false",
        "progress=false",
        f"hydra.run.dir={elsewhere / 'run'}",
    ]
    p = subprocess.run(job, capture_output=True, text=True, cwd=elsewhere, env=env, timeout=1200)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (elsewhere / "run" / "result.json").is_file() and (elsewhere / "outputs" / "mlflow.db").is_file()


def test_every_package_ships_in_the_wheel():
    """pyproject lists packages explicitly: a new folder of soce/ must be listed, or an installed soce lacks it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "soce").rglob("__init__.py")}
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"
