"""Importing bfcl-eval without its vendor SDKs, and without writing into site-packages.

bfcl-eval's checker imports its whole model registry, hence every API vendor's SDK (openai, anthropic,
google-cloud-aiplatform, ...: ~600 MB, one of them pinning numpy 1). soce runs none of them: the Llama and
xLAM handlers it uses only construct an (unused) OpenAI client. :func:`load` installs an import hook that
supplies a stand-in module for each of :data:`STAND_IN_ROOTS` that is NOT installed (an installed SDK is
always imported for real) while bfcl-eval is imported, and only then (the rest of the process sees absent
SDKs as absent), sets ``BFCL_PROJECT_ROOT`` to a scratch folder (bfcl-eval creates ``result/``
and ``score/`` there at import), then imports the package. A stand-in's classes can be subclassed,
constructed and caught; using one of their instances raises at once, naming the SDK.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

from soce.config import ConfigError

BFCL_VERSION = "2025.6.15"  # the v3 leaderboard's data (2025-06-14 checkpoint); later releases are v4
INSTALL_HINT = "benchmark.backend=bfcl needs bfcl-eval: make bfcl"
# SDKs bfcl-eval imports at module level for API models (none is called by soce), and its MiniCPM handler's
# code generator
STAND_IN_ROOTS = (
    "openai",
    "anthropic",
    "mistralai",
    "cohere",
    "vertexai",
    "google",
    "writerai",
    "boto3",
    "datamodel_code_generator",
)  # google: for google.api_core (and the namespace, when absent)


class StandInError(RuntimeError):
    """A vendor SDK that soce stands in for was used (bfcl-eval code that soce should never reach)."""


class _StandInType(type):
    """Class attributes of a stand-in class are stand-in classes too (``cohere.types.ToolV2`` in annotations)."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _StandInType(name, (_StandIn,), {"__module__": cls.__module__})
        setattr(cls, name, sub)
        return sub


class _StandIn(Exception, metaclass=_StandInType):
    """Any class of a stand-in SDK: subclassable, constructible with any arguments, usable in ``except``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __getattr__(self, name: str) -> Any:
        raise StandInError(
            f"{type(self).__module__}.{type(self).__name__}.{name}: this vendor SDK is a "
            f"stand-in (soce.benchmarks.bfcl_sdk); install the real one to use it"
        )


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        cls = _StandInType(name, (_StandIn,), {"__module__": self.__name__})
        setattr(self, name, cls)
        return cls


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on ``sys.meta_path``: consulted only for modules no real finder has, and only for the SDK roots."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not any(fullname == r or fullname.startswith(r + ".") for r in STAND_IN_ROOTS):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


STAND_INS: list[str] = []  # the SDK modules that stood in while bfcl-eval was imported (logs, fingerprint)


def _import_with_stand_ins(names: list[str]) -> dict[str, types.ModuleType]:
    """Import ``names`` with the stand-in hook on; then take the hook and the stand-ins out of ``sys.modules``
    again, so that the rest of the process sees the SDKs as absent (bfcl-eval's modules keep their refs)."""
    finder = _StandInFinder()
    sys.meta_path.append(finder)
    try:
        return {n: importlib.import_module(n) for n in names}
    finally:
        sys.meta_path.remove(finder)
        for name, module in list(sys.modules.items()):
            if isinstance(module, _StandInModule):  # no getattr: lazy modules (torch, transformers) import on it
                STAND_INS.append(name)
                del sys.modules[name]
                parent, _, child = name.rpartition(".")
                if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
                    delattr(sys.modules[parent], child)


def project_root() -> Path:
    """Where bfcl-eval may write (``BFCL_PROJECT_ROOT``): the caller's setting, else a per-process scratch dir."""
    if not os.environ.get("BFCL_PROJECT_ROOT"):
        os.environ["BFCL_PROJECT_ROOT"] = tempfile.mkdtemp(prefix="soce-bfcl-")
    return Path(os.environ["BFCL_PROJECT_ROOT"])


MODULES = (
    "constants.category_mapping",
    "constants.eval_config",
    "utils",
    "eval_checker.eval_runner",
    "eval_checker.multi_turn_eval.multi_turn_utils",
    "model_handler.local_inference.llama",
    "model_handler.local_inference.salesforce_llama",
    "_llm_response_generation",
)


@functools.cache
def load() -> types.SimpleNamespace:
    """bfcl-eval's modules soce uses, imported once; ConfigError (one line) when bfcl-eval is missing or not
    the pinned version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("bfcl-eval")
    except PackageNotFoundError:
        raise ConfigError(INSTALL_HINT) from None
    if found != BFCL_VERSION:
        raise ConfigError(f"benchmark.backend=bfcl needs bfcl-eval=={BFCL_VERSION} (BFCL v3), found {found}: make bfcl")
    project_root()
    try:
        mods = _import_with_stand_ins([f"bfcl_eval.{m}" for m in MODULES])
    except ImportError as e:
        raise ConfigError(f"{INSTALL_HINT} (importing it failed: {e})") from None
    return types.SimpleNamespace(**{k.rsplit(".", 1)[-1]: v for k, v in mods.items()})
