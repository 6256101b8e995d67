"""Input checks for a soup: weights, duplicate inputs, matching tensor names/shapes/dtypes."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from soce.soup.io import (
    AVERAGED,
    DTYPE_NAMES,
    ST_DTYPES,
    Checkpoint,
    SoupError,
    _Maps,
    _one_line,
    open_checkpoint,
    who,
)

log = logging.getLogger(__name__)


def nonfinite_error(
    key: str, index: int, sources: list[tuple[Path, torch.Tensor]], dtype: torch.dtype, offset: int = 0
) -> SoupError:
    """The one-line error for element ``index`` of a soup tensor that is NaN/inf: names the first source
    file whose value there is not finite, or says that the rounding to ``dtype`` overflowed. ``sources``:
    (file, 1-D tensor aligned with the soup's elements); ``offset`` is added to the element number shown."""
    for file, t in sources:
        v = float(t[index])
        if not math.isfinite(v):
            return SoupError(
                f"{file}: tensor {key!r} holds {v} at element {offset + index}: refused in a soup"
                " (pass allow_nonfinite=true to mix it anyway)"
            )
    return SoupError(
        f"{sources[0][0]}: tensor {key!r}: the soup overflows {str(dtype).removeprefix('torch.')}"
        f" at element {offset + index} (pass allow_nonfinite=true to keep the inf)"
    )


def check_finite(
    soup: Mapping[str, torch.Tensor], sources: list[tuple[Checkpoint, Mapping[str, torch.Tensor]]]
) -> None:
    """SoupError (one line: tensor and source file) when a floating tensor of ``soup`` (file key -> tensor)
    holds NaN/inf. ``sources``: the mixed candidates and their tensors by file key. Costs one float32 sum per
    tensor and one synchronisation per device; the elementwise search runs only for a flagged tensor."""
    by_dev: dict[torch.device, list[str]] = {}
    for k, t in soup.items():
        if t.dtype in AVERAGED and t.numel():
            by_dev.setdefault(t.device, []).append(k)
    flagged = set()
    for keys in by_dev.values():  # one stack and one synchronisation per device (a sharded model spans several)
        sums = torch.stack([soup[k].sum(dtype=torch.float32) for k in keys])
        flagged.update(k for k, ok in zip(keys, torch.isfinite(sums).tolist(), strict=True) if not ok)
    for k in [k for k in soup if k in flagged]:
        bad = (~torch.isfinite(soup[k].reshape(-1))).nonzero()
        if len(bad):
            srcs = [(c.tensors[k].file, t[k].reshape(-1)) for c, t in sources]
            raise nonfinite_error(k, int(bad[0]), srcs, soup[k].dtype)


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise SoupError(f"dtype {name!r}: unknown (use one of bfloat16, float16, float32, float64)")
    return DTYPE_NAMES[key]


def check_weights(
    names: list[str],
    weights: Mapping[str, float],
    *,
    normalize: bool = True,
    subset: bool = False,
    signed: bool = False,
) -> dict[str, float]:
    """Check weights (numbers, finite, >= 0 unless ``signed``, not all 0, one per candidate unless ``subset``)
    and return them as given, in ``names`` order, zeros dropped. ``normalize=False`` rejects a sum off 1 by
    more than 1e-6. ``signed``: the task-vector operators, where a negative weight subtracts a task vector
    (task arithmetic's negation, as mergekit allows)."""
    unknown = [k for k in weights if k not in names]
    if unknown:
        raise SoupError(f"weights: {unknown[0]!r} is not a candidate (candidates: {', '.join(names)})")
    if not subset:
        missing = [n for n in names if n not in weights]
        if missing:
            raise SoupError(f"weights: no weight for candidate {missing[0]!r} (one weight per candidate)")
    out: dict[str, float] = {}
    for n in names:
        if n not in weights:
            continue
        try:
            w = float(weights[n])
        except (TypeError, ValueError) as e:
            raise SoupError(f"weights: {n!r} = {weights[n]!r} is not a number") from e
        if not math.isfinite(w):
            raise SoupError(f"weights: {n!r} = {w} is not finite")
        if w < 0 and not signed:
            raise SoupError(
                f"weights: {n!r} = {w} is negative (a linear soup takes non-negative weights; the task-vector"
                " operators, e.g. method=task_arithmetic, take negative ones)"
            )
        out[n] = w
    total = math.fsum(out.values())
    if not any(out.values()) or (total <= 0 and not signed):
        raise SoupError("weights: all weights are zero")
    if not normalize and abs(total - 1.0) > 1e-6:
        raise SoupError(f"weights: sum {total!r} != 1 and normalize=false")
    return {n: w for n, w in out.items() if w != 0}


def _dedup(models: Mapping[str, str | Path], weights: Mapping[str, float] | None = None):
    """Merge candidates that resolve to the same path: keep the first name, sum the weights.
    Returns (models, weights, {dropped name: kept name})."""
    if not models:
        raise SoupError("models: no candidates given")
    seen: dict[Path, str] = {}
    out: dict[str, Path] = {}
    alias: dict[str, str] = {}
    for name, p in models.items():
        rp = Path(p).expanduser().resolve()
        if rp in seen:
            alias[str(name)] = seen[rp]
        else:
            seen[rp] = str(name)
            out[str(name)] = rp
    if weights is None:
        return out, None, alias
    merged: dict[str, Any] = {}
    for name, w in weights.items():
        tgt = alias.get(str(name), str(name))
        if tgt in merged:
            try:
                merged[tgt] = float(merged[tgt]) + float(w)
            except (TypeError, ValueError) as e:
                raise SoupError(f"weights: {name!r} = {w!r} is not a number") from e
        else:
            merged[tgt] = w
    return out, merged, alias


def _check(ckpts: list[Checkpoint], mixed_ok: bool = False) -> None:
    """Identical tensor names, shapes and dtypes across candidates (floating dtypes may differ when
    ``mixed_ok``: an output dtype was given); non-floating tensors identical; one line per failure."""
    ref = ckpts[0]
    for c in ckpts[1:]:
        for key, info in ref.tensors.items():
            other = c.tensors.get(key)
            if other is None:
                raise SoupError(f"{c.path}: tensor {key!r} missing in {who(c.name)} (present in {info.file})")
            if other.shape != info.shape:
                what = " (vocabulary rows differ)" if other.shape[1:] == info.shape[1:] else ""
                raise SoupError(
                    f"{other.file}: tensor {key!r} shape {list(other.shape)} != {list(info.shape)} in {info.file}{what}"
                )
            floating = ST_DTYPES[other.dtype] in AVERAGED and ST_DTYPES[info.dtype] in AVERAGED
            if other.dtype != info.dtype and not (mixed_ok and floating):
                hint = "pass an output dtype (dtype=bfloat16, ...) to mix them" if floating else "cannot be mixed"
                raise SoupError(
                    f"{other.file}: tensor {key!r} dtype {other.dtype} != {info.dtype} in {info.file} ({hint})"
                )
        extra = [k for k in c.tensors if k not in ref.tensors]
        if extra:
            raise SoupError(
                f"{c.tensors[extra[0]].file}: tensor {extra[0]!r} only in {who(c.name)} (missing in {ref.path})"
            )
    fixed = [k for k, i in ref.tensors.items() if ST_DTYPES[i.dtype] not in AVERAGED and i.numel]
    if fixed and len(ckpts) > 1:
        maps = _Maps()
        try:
            for k in fixed:
                first = maps.view(ref.tensors[k], 0, ref.tensors[k].numel)
                for c in ckpts[1:]:
                    if not torch.equal(first, maps.view(c.tensors[k], 0, ref.tensors[k].numel)):
                        raise SoupError(
                            f"{c.tensors[k].file}: tensor {k!r} ({ref.tensors[k].dtype}) differs from"
                            f" {ref.tensors[k].file} and cannot be averaged"
                        )
            del first
        finally:
            maps.close()
    check_configs({c.name: c.path for c in ckpts})


# config.json keys (at any depth, e.g. text_config.rope_theta) that define what the weights compute: a soup
# of candidates differing in one is refused. Any other difference (eos ids, max_position_embeddings, versions)
# is listed in one warning, and the donor's value is kept.
ARCHITECTURE_KEYS = frozenset(
    {
        "model_type",
        "architectures",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "hidden_activation",
        "activation_function",
        "rms_norm_eps",
        "layer_norm_eps",
        "layer_norm_epsilon",
        "norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "rope_type",
        "partial_rotary_factor",
        "rotary_pct",
        "rotary_emb_base",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "qkv_bias",
        "sliding_window",
        "use_sliding_window",
        "layer_types",
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
        "parallel_residual",
        "position_embedding_type",
        "use_qk_norm",
        "qk_layernorm",
        "embedding_multiplier",
        "logits_scaling",
        "residual_multiplier",
        "attention_multiplier",
    }
)
_IGNORED_KEYS = frozenset({"_name_or_path"})  # where the file came from, not what it is


def _flat(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping) and k not in ARCHITECTURE_KEYS:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_configs(paths: Mapping[str, Path], warn: bool = True) -> list[str]:
    """Compare the candidates' ``config.json`` (those that have one) with the first one's. A difference in an
    :data:`ARCHITECTURE_KEYS` key raises SoupError naming the key and both values; other differences are
    logged in one warning when ``warn`` (the donor's value is kept) and returned as ``key (name: value, ...)``."""
    flat: dict[str, dict[str, Any]] = {}
    for name, path in paths.items():
        cfg = Path(path) / "config.json"
        if Path(path).is_dir() and cfg.is_file():
            try:
                flat[name] = _flat(json.loads(cfg.read_text()))
            except (OSError, ValueError, AttributeError) as e:
                raise SoupError(f"{cfg}: unreadable config ({_one_line(e)})") from e
    if len(flat) < 2:
        return []
    keys = sorted({k for f in flat.values() for k in f} - _IGNORED_KEYS)
    diffs = {k: {n: f.get(k) for n, f in flat.items()} for k in keys}
    diffs = {k: v for k, v in diffs.items() if len({json.dumps(x, sort_keys=True) for x in v.values()}) > 1}
    arch = [k for k in diffs if k.rsplit(".", 1)[-1] in ARCHITECTURE_KEYS]
    if arch:
        first = arch[0]
        a, *rest = diffs[first].items()
        other = next(x for x in rest if json.dumps(x[1], sort_keys=True) != json.dumps(a[1], sort_keys=True))
        raise SoupError(
            f"config.json: candidates differ in {first!r}, which defines the architecture "
            f"({a[0]}: {a[1]!r}, {other[0]}: {other[1]!r}); they cannot be souped"
        )
    notes = [f"{k} ({', '.join(f'{n}: {v!r}' for n, v in vs.items())})" for k, vs in diffs.items()]
    if notes and warn:
        log.warning("candidates' config.json differ in %s: the donor's values are kept", "; ".join(notes))
    return notes


def _open_all(models: Mapping[str, Path], mixed_ok: bool = False) -> list[Checkpoint]:
    ckpts = [open_checkpoint(n, p) for n, p in models.items()]
    _check(ckpts, mixed_ok)
    return ckpts


def check_models(models: Mapping[str, str | Path]) -> dict:
    """Validate candidates (headers only, no tensor data read). Returns a summary:
    ``{"candidates": {name: path}, "duplicates": {name: kept}, "tensors": n, "parameters": n,
    "bytes": n, "dtypes": {dtype: n tensors}, "shapes": {key: shape}}``. Raises SoupError."""
    mp, _, alias = _dedup(models)
    ckpts = _open_all(mp)
    ref = ckpts[0].tensors
    dtypes: dict[str, int] = {}
    for info in ref.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    return {
        "candidates": {c.name: str(c.path) for c in ckpts},
        "duplicates": alias,
        "tensors": len(ref),
        "parameters": sum(i.numel for i in ref.values()),
        "bytes": sum(i.end - i.begin for i in ref.values()),
        "dtypes": dtypes,
        "shapes": {k: list(i.shape) for k, i in ref.items()},
    }
