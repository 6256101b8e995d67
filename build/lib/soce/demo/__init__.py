"""The built-in demo: a tiny synthetic benchmark and a tiny model zoo, built locally from a seed.

``build_demo(DemoConfig(preset="cpu"))`` returns a manifest with lm-eval task YAMLs, a base checkpoint,
fine-tuned candidates and a correlation population (see :mod:`soce.demo.zoo`).
"""

from soce.config import DemoConfig
from soce.demo.zoo import build_demo

__all__ = ["DemoConfig", "build_demo"]
