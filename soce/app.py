"""``python -m soce``: the Hydra entry point. Composes the config and calls ``soce.pipeline.run``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from soce.config import register_configs, to_plain
from soce.tracking import PARENT_FILE

register_configs()
log = logging.getLogger("soce")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from soce.pipeline import run

    hc = HydraConfig.get()
    parent = None
    if hc.mode == RunMode.MULTIRUN:
        marker = Path(hc.sweep.dir) / PARENT_FILE
        if marker.exists():
            parent = json.loads(marker.read_text())["run_id"]
    result = run(to_plain(cfg), Path(hc.runtime.output_dir), parent)
    scores = result["scores"]
    log.info("%s: %s", result["strategy"],
             ", ".join(f"{s} overall {100 * v['overall']:.2f}%" for s, v in scores.items()))


if __name__ == "__main__":
    main()
