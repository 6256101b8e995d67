"""``python -m soce``: the Hydra entry point. Composes the config and calls ``soce.pipeline.run``.

Before Hydra starts any job, every job's config is composed and validated (for a sweep, every value
of every swept key), so a bad input fails with one line and nothing is written.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from soce.callbacks import sweep_key
from soce.config import register_configs, to_plain, unknown_keys
from soce.tracking import PARENT_FILE

register_configs()
log = logging.getLogger("soce")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # the project's conf/ (editable install)
_NO_PREFLIGHT = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--package", "-p",
                 "--shell-completion", "-sc", "--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp",
                 "--version", "--experimental-rerun"}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from soce.pipeline import run

    hc = HydraConfig.get()
    parent, job_key = None, None
    if hc.mode == RunMode.MULTIRUN:
        marker = Path(hc.sweep.dir) / PARENT_FILE
        if marker.exists():
            info = json.loads(marker.read_text())
            parent = info["run_id"]
            job_key = sweep_key([info.get("sweep_key", ""), *hc.overrides.task])
    result = run(to_plain(cfg), Path(hc.runtime.output_dir), parent, job_key)
    log.info("%s: %s", result["strategy"],
             ", ".join(f"{s} overall {100 * v['overall']:.2f}%" for s, v in result["scores"].items()))


MAX_CHECKED_JOBS = 256  # a larger sweep has each swept value checked once (others at their first value)


def job_overrides(overrides: list[str]) -> list[list[str]]:
    """The override lists to check before a multirun: every job of the sweep (the product of the swept
    values) up to MAX_CHECKED_JOBS, else one list per value of every swept key, others at their first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    first, sweeps = [], []
    for o in parsed:
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # interval sweeps (for optimising sweepers) have no finite list
                continue
            sweeps.append((o, values))
            first.append(f"{o.get_key_element()}={values[0]}")
        else:
            first.append(o.input_line)
    if math.prod(len(v) for _, v in sweeps) <= MAX_CHECKED_JOBS:
        keys = [o.get_key_element() for o, _ in sweeps]
        jobs = []
        for combo in itertools.product(*(values for _, values in sweeps)):
            chosen = dict(zip(keys, combo, strict=True))
            jobs.append([f"{k}={chosen[k]}" if (k := x.split("=", 1)[0]) in chosen else x for x in first])
        return jobs
    lists = [first]
    for o, values in sweeps:
        key = o.get_key_element()
        for v in values[1:]:
            lists.append([f"{key}={v}" if x.split("=", 1)[0] == key else x for x in first])
    return lists


def compose_plain(overrides: list[str]) -> dict:
    """The resolved job config (plain dicts, no ``hydra`` node) for one list of overrides (no sweeps)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from soce.pipeline import ConfigError

    with initialize_config_dir(CONF_DIR, version_base="1.3", job_name="soce"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    extra = unknown_keys(cfg)
    if extra:
        raise ConfigError(f"unknown config key '{extra[0]}' (check the spelling; `--cfg job` shows the config)")
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return to_plain(cfg)


def preflight(overrides: list[str]) -> str | None:
    """Compose and validate every job's config; the first problem as one line, or None."""
    from soce.pipeline import ConfigError, validate

    try:
        for ov in job_overrides(overrides):
            validate(compose_plain(ov))
    except ConfigError as e:
        return str(e)
    except Exception as e:  # Hydra/OmegaConf composition errors: condense to one line
        return _one_line(e)
    return None


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    head = lines[0] if lines else type(e).__name__
    if "Available options" in str(e):
        opts = [ln for ln in lines if not ln.startswith(("Available", "Config search", "provider="))][1:]
        head += f" (available: {', '.join(opts)})"
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip() and str(cause).splitlines()[0] not in head:
        head = head.rstrip(".") + ": " + str(cause).strip().splitlines()[0]
    return head.replace("In 'config': ", "")


def main() -> None:
    args = sys.argv[1:]
    if not any(a.split("=", 1)[0] in _NO_PREFLIGHT for a in args):
        problem = preflight([a for a in args if not a.startswith("-")])
        if problem:
            print(f"soce: error: {problem}", file=sys.stderr)
            raise SystemExit(2)
    hydra_main()


if __name__ == "__main__":
    main()
