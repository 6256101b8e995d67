"""A soup's provenance: the recipe (safetensors metadata, ``soce_recipe.json``) and the model card (README.md)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from soce.soup.io import Checkpoint
from soce.soup.operators import MergeSpec

RECIPE_FILE = "soce_recipe.json"  # beside the shards of every soup soce writes: its recipe, as JSON

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
CHOSEN_KEYS = ("benchmark", "split", "objective", "score")  # recipe keys shown as "where it was chosen"
ARITHMETIC = {
    "linear": "float32 fused multiply-add from 0 in candidate order (float64 for float64 tensors), divided by"
    " the float32 sum of the weights unless it is 1, rounded to the output dtype",
    "task_vector": "mergekit 0.1.5's generalized task arithmetic in float32 (float64 for float64 tensors):"
    " tau_j = M_j - base, sparsified (density < 1), times w_j, combined, divided by the weights' sum (normalize),"
    " times lambda, plus the base, rounded once to the output dtype",
}
DESCRIPTION = {
    "linear": "A linear model soup: every tensor is the weighted average of the candidates' tensors, accumulated"
    " in float32 and rounded to the output dtype.",
    "task_arithmetic": "Task arithmetic: every tensor is base + lambda * sum_j w_j (M_j - base).",
    "ties": "TIES merging: each task vector M_j - base trimmed to its largest magnitudes (density), the sign"
    " elected per element, the agreeing entries averaged by weight, added to the base.",
    "dare_linear": "DARE: each task vector M_j - base keeps a random fraction (density) of its entries"
    " (rescaled to its L1 norm with rescale), then task arithmetic.",
    "dare_ties": "DARE with TIES' sign election: a random drop (and rescale) of each task vector, then TIES'"
    " election and weighted mean, added to the base.",
}


def _value(v: Any) -> str:
    """A parameter as the command line writes it (``true``, not ``True``)."""
    return str(v).lower() if isinstance(v, bool) else str(v)


def recipe(
    ckpts: list[Checkpoint],
    ws: dict[str, float],
    donor: str,
    dtype: torch.dtype | None,
    alias: dict[str, str],
    extra: Mapping[str, Any] | None,
    spec: MergeSpec,
    base: Checkpoint | None = None,
) -> dict:
    """The recipe of a soup: soce version, operator and parameters, candidates with their weights (linear:
    normalised to sum 1 as well as given; task vectors: as given), base, donor, dtype, duplicates merged,
    plus ``extra`` (the caller's keys: strategy, split, objective, score...)."""
    from soce import __version__

    total = math.fsum(ws.values())
    linear = spec.method == "linear"
    rec: dict[str, Any] = {
        "soce_version": __version__,
        "method": spec.method,
        "accumulation": ARITHMETIC["linear" if linear else "task_vector"],
        "candidates": [
            {
                "name": c.name,
                "path": str(c.path),
                "weight": ws.get(c.name, 0.0) / total if linear else ws.get(c.name, 0.0),
                "given_weight": ws.get(c.name, 0.0),
            }
            for c in ckpts
        ],
        "donor": donor,
        "dtype": str(dtype).removeprefix("torch.") if dtype else "as candidates",
    }
    if not linear:
        rec["merge"] = spec.params()
        rec["base"] = str(base.path) if base is not None else None
    if alias:
        rec["duplicates_merged"] = alias
    if extra:
        rec.update({str(k): v for k, v in dict(extra).items()})
    return rec


def base_model(path: str, hub_id: str | None = None) -> str | None:
    """A checkpoint as the hub's ``base_model``: ``hub_id`` (the recipe's ``hub_ids``: how the pool named it),
    else its config's ``_name_or_path`` when that is a hub id (``org/name``, not a local path), else None (a
    local path is no hub id: it stays in the card's table and the recipe)."""
    try:
        name = hub_id or json.loads((Path(path) / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str) and _HUB_ID.match(name) and ".." not in name and not Path(name).exists():
        return name
    return None


def model_card(rec: dict, n_shards: int, copied: list[str]) -> str:
    """README.md: hub front matter (``base_model`` = the base, if any, and the ingredients;
    ``library_name``, ``tags``), the operator, the ingredients and weights, where the soup was chosen
    (recipe keys :data:`CHOSEN_KEYS`), the recipe."""
    import yaml

    used = [c for c in rec["candidates"] if c["weight"] != 0]
    hub = ([base_model(rec["base"])] if rec.get("base") else []) + [
        base_model(c["path"], (rec.get("hub_ids") or {}).get(c["name"])) for c in used
    ]
    front = {
        **({"base_model": [h for h in hub if h]} if any(hub) else {}),
        "library_name": "transformers",
        "tags": ["merge", "soce"] + ([rec["method"]] if rec["method"] != "linear" else []),
    }
    rows = "\n".join(f"| {c['name']} | `{c['path']}` | {c['weight']:.6g} |" for c in rec["candidates"])
    chosen = "\n".join(f"- {k}: {rec[k]}" for k in CHOSEN_KEYS if rec.get(k) is not None)
    params = rec.get("merge") if rec["method"] != "linear" else None
    op = ""
    if params:
        given = ", ".join(f"{k}={_value(v)}" for k, v in params.items() if k != "method")
        op = f"Operator **{rec['method']}** with {given} over the base `{rec['base']}`.\n\n"
    extra = {k: v for k, v in rec.items() if k not in ("candidates",)}
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# Model soup: {rec.get('strategy', rec['method'])}, {len(used)} ingredient(s)\n\n"
        f"{DESCRIPTION[rec['method']]} Written by soce {rec['soce_version']}.\n\n"
        + op
        + "| candidate | path | weight |\n|---|---|---|\n"
        f"{rows}\n\n"
        "## Where it was chosen\n\n" + (chosen or "Weights given by the caller (no benchmark recorded).") + "\n\n"
        f"Config, generation config and tokenizer copied from donor **{rec['donor']}**: "
        f"{', '.join(copied) or 'none found'}.\n\n"
        f"Weights in {n_shards} shard(s).\n\n"
        "## Recipe\n\n```json\n" + json.dumps(extra, indent=2, default=str) + "\n```\n"
    )
