"""``python -m soce``: the Hydra entry point. Composes the config and calls ``soce.job.pipeline.run``.

Before Hydra starts any job, every job's config is composed and validated (``soce.job.preflight``; for a
sweep, every value of every swept key), so a bad input fails with one line and nothing is written.
``--dry-run`` lists the jobs a multirun would launch without running them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from soce.config import CONF_DIR, register_configs, typed
from soce.job.preflight import job_overrides, preflight

register_configs()
log = logging.getLogger("soce")
# Hydra's own flags: they compose no job, so there is nothing to check first
_NO_PREFLIGHT = {
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--cfg",
    "-c",
    "--resolve",
    "--package",
    "-p",
    "--shell-completion",
    "-sc",
    "--config-dir",
    "-cd",
    "--config-name",
    "-cn",
    "--config-path",
    "-cp",
    "--version",
    "--experimental-rerun",
}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from soce.job.pipeline import run
    from soce.report.tables import format_answer
    from soce.tracking.naming import job_name
    from soce.tracking.runs import end_run, read_parent

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    info = read_parent(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    parent = info.run_id if info else None
    name = job_name(overrides, info.varying if info else [], cfg.strategy.name, info.sweep_key if info else None)
    out_dir = Path(hc.runtime.output_dir)
    try:
        result = run(typed(cfg), out_dir, parent, name)
    except ValueError as e:  # ConfigError, SoupError, score-table problems: bad input found inside the job
        if not _is_input_error(e) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"soce: error: {e}", file=sys.stderr)
        if info:  # Hydra skips its callbacks when a job exits: the sweep's parent run ends here
            end_run(info.uri, info.run_id, "FAILED")
        raise SystemExit(2) from None
    log.info(format_answer(result.to_json(), out_dir / "result.json"))


def _is_input_error(e: BaseException) -> bool:
    from soce.config import ConfigError
    from soce.soup import SoupError

    return isinstance(e, ConfigError | SoupError)


def dry_run(overrides: list[str]) -> int:
    """Print the jobs a (multi)run would launch, one line of overrides each, and their count."""
    jobs = job_overrides(overrides, max_jobs=float("inf"))
    for i, job in enumerate(jobs):
        print(f"{i:3d}  {' '.join(job) or '(defaults)'}")
    print(f"{len(jobs)} job{'s' * (len(jobs) != 1)}; nothing was run")
    return 0


def print_help() -> int:
    """soce's ``--help`` (header and footer from conf/hydra/help/soce.yaml, the groups from conf/): the same
    text as Hydra's help template without composing the config, which takes Hydra seconds."""
    import yaml

    conf = Path(CONF_DIR)
    text = yaml.safe_load((conf / "hydra" / "help" / "soce.yaml").read_text())
    groups = {
        g.name: sorted(p.stem for p in g.glob("*.yaml"))
        for g in sorted(conf.iterdir())
        if g.is_dir() and g.name != "hydra" and any(g.glob("*.yaml"))
    }
    lines = [text["header"].rstrip(), "", "== Configuration groups (group=option) =="]
    lines += [f"{g}: {', '.join(opts)}" for g, opts in groups.items()]
    print("\n".join([*lines, "", text["footer"].rstrip()]))
    return 0


def main() -> None:
    args = sys.argv[1:]
    if any(a in ("--help", "-h") for a in args):
        raise SystemExit(print_help())
    overrides = [a for a in args if not a.startswith("-")]
    if not any(a.split("=", 1)[0] in _NO_PREFLIGHT for a in args):
        problem = preflight(overrides)
        if problem:
            print(f"soce: error: {problem}", file=sys.stderr)
            raise SystemExit(2)
        if "--dry-run" in args:
            raise SystemExit(dry_run(overrides))
    hydra_main()


if __name__ == "__main__":
    main()
