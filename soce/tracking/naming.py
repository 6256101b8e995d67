"""A job's name: its identity (the key its MLflow run, cache and result are found by) and its label
(what tables, figures, logs and the MLflow UI show), both built here from the job's overrides."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class JobName:
    """A job's one name. ``label``: what every reader shows (MLflow run name and tag ``soce.label``, report rows,
    figures, log lines, ``result.json``); ``key``: the job's identity within its sweep, by which an interrupted
    job finds its MLflow run again (None outside a multirun); ``overrides``: the job's own ``{key: value}``."""

    label: str
    key: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)


def job_name(
    task_overrides: list[str], varying: list[str], strategy: str | None = None, sweep: str | None = None
) -> JobName:
    """The name of the job with ``task_overrides`` in a sweep whose ``varying`` keys take several values;
    ``sweep`` is the sweep's key (:func:`sweep_key`), None outside a multirun. The one place a job is named."""
    key = sweep_key([sweep, *task_overrides]) if sweep is not None else None
    return JobName(job_label(task_overrides, varying, strategy), key, dict(parse_override(o) for o in task_overrides))


def sweep_key(overrides: list[str]) -> str:
    """Identity of a sweep: its command-line overrides, order-free, without hydra.* and launcher settings."""
    keep = sorted(o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/")))
    return hashlib.sha256("\n".join(keep).encode()).hexdigest()[:16]


def varying_keys(overrides: list[str]) -> list[str]:
    """The keys of the sweep overrides that take more than one value (choice, range, glob, interval), in
    command-line order, hydra.* left out: ['strategy', 'selection.tau'] for
    ``strategy=a,b selection.tau=0.1,0.5 debug=fast``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.get_key_element().split("@", 1)[0].lstrip("+~")
        if not o.is_sweep_override() or key.startswith(("hydra.", "hydra/")):
            continue
        try:
            n = len(list(o.sweep_string_iterator()))
        except Exception:  # interval sweeps (optimising sweepers): always varying
            n = 2
        if n > 1:
            out.append(key)
    return out


def parse_override(override: str) -> tuple[str, str]:
    """('selection.tau', '0.1') for 'selection.tau=0.1' (also '+x=..', '++x=..', '~x')."""
    key, _, value = override.lstrip("+~").partition("=")
    return key.split("@", 1)[0], value


def short_keys(keys: list[str]) -> dict[str, str]:
    """{key: shortest dotted suffix that no other key ends with}: 'selection.tau' -> 'tau'."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if not any(o != k and (o == short or o.endswith("." + short)) for o in keys):
                break
        out[k] = short
    return out


def job_label(task_overrides: list[str], varying_keys: list[str], strategy: str | None = None) -> str:
    """A job's name in tables, figures and MLflow: the strategy, then ``short=value`` for each override that
    varies across the sweep, e.g. 'soce_weighted tau=0.1'. ``strategy`` defaults to the override's value."""
    values = dict(parse_override(o) for o in task_overrides)
    strategy = strategy or values.get("strategy")
    short = short_keys([k for k in varying_keys if k != "strategy"])
    parts = [strategy] if strategy else []
    parts += [f"{short[k]}={values[k]}" for k in short if k in values]
    return " ".join(parts) or "job"


def merged_label(task_overrides: list[list[str]], varying_keys: list[str], strategy: str | None = None) -> str:
    """The label of several jobs that made one soup: :func:`job_label`, each varying override listing the
    values it took among them, e.g. 'uniform tau=0.3,0.6' (uniform's soup does not depend on tau)."""
    values = [dict(parse_override(o) for o in ov) for ov in task_overrides]
    strategy = strategy or values[0].get("strategy")
    short = short_keys([k for k in varying_keys if k != "strategy"])
    parts = [strategy] if strategy else []
    for k in short:
        seen = list(dict.fromkeys(v[k] for v in values if k in v))
        if seen:
            parts.append(f"{short[k]}={','.join(seen)}")
    return " ".join(parts) or "job"
