"""Shared fixtures: offline environment, and one tiny demo zoo built once per test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _hf_home(tmp_path_factory):
    """Keep the datasets cache of the tests out of the user's HF_HOME."""
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory) -> Path:
    """A demo root holding the fast zoo (seed 0, as debug=fast uses), built once for the end-to-end tests."""
    from soce.demo.zoo import DemoConfig, build_demo

    root = tmp_path_factory.mktemp("demo")
    build_demo(DemoConfig(seed=0, preset="fast", root=str(root)), progress=False)
    return root


def soce_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "soce", *args]
