"""Merge-only entry point: write a soup without a benchmark.

    python -m soce.merge output=OUT 'models=[P1,P2,...]' 'weights=[w1,w2,...]' \\
        [method=linear|task_arithmetic|ties|dare_linear|dare_ties] [base=CKPT] [density=D] [lambda=L] \\
        [rescale=BOOL] [seed=N] [names=[n1,n2,...]] [donor=NAME|INDEX] [dtype=bfloat16] \\
        [max_shard_size=5GB] [overwrite=true] [normalize=BOOL] [strategy=TEXT] [allow_nonfinite=false]

``method`` (default linear) picks the operator; task-vector operators need ``base`` (the checkpoint the
models were fine-tuned from; linear takes none) and take mergekit's parameters: ``density`` (fraction kept,
TIES/DARE), ``lambda``, ``normalize`` (default: the operator's), ``rescale`` (to the task vector's L1 norm
after TIES' trim or DARE's drop), ``seed`` (DARE's masks, which also depend on each model's name: ``names``,
by default the directories' names). ``overwrite=true`` replaces an earlier soup (a directory holding
``soce_recipe.json``) or an empty directory, nothing else.

Arguments are Hydra-style ``key=value`` overrides (lists in brackets, comma separated). Bad input prints one
``soce.merge: error: ...`` line to stderr and exits with status 2 (nothing is written; an output that
resolves into or over an input, or that another merge published first, is bad input too); success prints
the output path. NaN/inf in a soup is refused unless allow_nonfinite=true.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

USAGE = __doc__.split("\n\n")[1]
KEYS = (
    "output",
    "models",
    "weights",
    "names",
    "donor",
    "dtype",
    "max_shard_size",
    "overwrite",
    "normalize",
    "strategy",
    "allow_nonfinite",
    "method",
    "base",
    "density",
    "lambda",
    "rescale",
    "seed",
)
MERGE_KEYS = ("method", "density", "lambda", "normalize", "rescale", "seed")


class UsageError(ValueError):
    """A bad command line; the message is one line."""


def _list(key: str, value: str) -> list[str]:
    v = value.strip()
    if not (v.startswith("[") and v.endswith("]")):
        raise UsageError(f"{key}: expected a list like {key}=[a,b], got {value!r}")
    items = [x.strip().strip("'\"") for x in v[1:-1].split(",")]
    return [x for x in items if x] if any(items) else []


def _bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise UsageError(f"{key}: expected true or false, got {value!r}")


def parse_args(argv: list[str]) -> dict:
    """``key=value`` overrides -> keyword arguments of :func:`soce.soup.write_soup` plus ``models``,
    ``weights`` (dicts keyed by candidate name) and ``output``."""
    raw: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or key not in KEYS:
            raise UsageError(f"unknown argument {arg!r} (expected key=value with key in {', '.join(KEYS)})")
        raw[key] = value
    for key in ("output", "models", "weights"):
        if key not in raw or not raw[key].strip():
            raise UsageError(f"missing {key}=... ; usage: python -m soce.merge {USAGE.split(None, 3)[3]}")
    paths = _list("models", raw["models"])
    if not paths:
        raise UsageError("models: empty list")
    try:
        weights = [float(w) for w in _list("weights", raw["weights"])]
    except ValueError as e:
        raise UsageError(f"weights: {e}") from e
    if len(weights) != len(paths):
        raise UsageError(f"weights: {len(weights)} weights for {len(paths)} models (one weight per model)")
    names = _list("names", raw["names"]) if "names" in raw else _default_names(paths)
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise UsageError(f"names: need {len(paths)} distinct names, got {names}")
    kw: dict = {"models": dict(zip(names, paths, strict=True)), "weights": {}, "output": raw["output"]}
    for n, w in zip(names, weights, strict=True):
        kw["weights"][n] = w
    if "donor" in raw:
        d = raw["donor"].strip()
        kw["donor"] = names[int(d)] if d.isdigit() and int(d) < len(names) and d not in names else d
    if "dtype" in raw:
        kw["dtype"] = raw["dtype"].strip()
    if "max_shard_size" in raw:
        s = raw["max_shard_size"].strip()
        kw["max_shard_size"] = int(s) if s.isdigit() else s
    for key in ("overwrite", "normalize", "allow_nonfinite"):
        if key in raw:
            kw[key] = _bool(key, raw[key])
    if any(k in raw for k in MERGE_KEYS if k != "normalize"):
        kw["merge"] = _merge(raw)
        kw.pop("normalize", None)
    if "base" in raw:
        if raw.get("method", "linear").strip() == "linear":  # a plain average would silently ignore it
            raise UsageError(
                "base: method linear averages the models and takes no base (task vectors over a base:"
                " method=task_arithmetic, ties, dare_linear or dare_ties)"
            )
        kw["base"] = raw["base"].strip()
    kw["recipe"] = {"strategy": raw.get("strategy", "manual"), "tool": "soce.merge"}
    return kw


def _merge(raw: dict[str, str]) -> dict:
    """The ``merge`` mapping of :func:`soce.soup.write_soup` from the operator's arguments."""
    m: dict = {"method": raw.get("method", "linear").strip()}
    for key, conv in (("density", float), ("lambda", float), ("seed", int)):
        if key in raw:
            try:
                m[key] = conv(raw[key].strip())
            except ValueError:
                raise UsageError(f"{key}: expected a number, got {raw[key]!r}") from None
    for key in ("normalize", "rescale"):
        if key in raw:
            m[key] = _bool(key, raw[key])
    return m


def _default_names(paths: list[str]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base = Path(p.rstrip("/")).name or p
        n, i = base, 2
        while n in names:
            n, i = f"{base}-{i}", i + 1
        names.append(n)
    return names


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "help" or any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0 if argv else 2
    from soce.soup import SoupError, write_soup

    # SIGTERM unwinds like Ctrl-C, so the temporary output directory is removed (SIGKILL leaves a hidden
    # temporary sibling that the next merge into the same directory removes; never a partial target).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        kw = parse_args(argv)
        out = write_soup(**kw)  # every input is checked before anything is written: no warning before an error
    except (UsageError, SoupError) as e:
        print(f"soce.merge: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"soce.merge: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    _warn_renormalised(kw)
    print(out)
    return 0


def _warn_renormalised(kw: dict) -> None:
    """One line on stderr when a linear soup's weights did not sum to 1 and were divided by their sum."""
    linear = (kw.get("merge") or {}).get("method", "linear") == "linear"
    total = sum(kw["weights"].values())
    if linear and kw.get("normalize", True) and total > 0 and abs(total - 1) > 1e-6:
        print(
            f"soce.merge: warning: weights sum to {total:g}, not 1: each was divided by that sum "
            "(normalize=false refuses instead)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())
