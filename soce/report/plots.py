"""Every figure soce draws (matplotlib's object API, no global state; PNG files for MLflow and reports)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from soce.report.analyses import ConsistencyResult, ShapleyResult


def correlation_heatmap(corr: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Write the category correlation matrix as an annotated heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(corr)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.6 + 0.6 * n))
    im = ax.imshow(corr.values, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), corr.columns, rotation=45, ha="right")
    ax.set_yticks(range(n), corr.index)
    for i in range(n):
        for j in range(n):
            v = corr.values[i, j]
            ax.text(j, i, "" if pd.isna(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="Pearson r")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110, format="png")
    return p


def _heatmap(ax, corr: pd.DataFrame, title: str, annotate: bool):
    n = len(corr)
    im = ax.imshow(corr.to_numpy(dtype=float), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), [str(c) for c in corr.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), [str(c) for c in corr.index], fontsize=8)
    if annotate:
        for i in range(n):
            for j in range(n):
                v = corr.iat[i, j]
                ax.text(
                    j,
                    i,
                    "n/a" if pd.isna(v) else f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if not pd.isna(v) and abs(v) > 0.6 else "black",
                )
    ax.set_title(title, fontsize=9)
    return im


def consistency_figure(result: ConsistencyResult, path: str | Path) -> Path:
    """Before/after heatmaps (candidates | soups) of the category correlations, titled with mean off-diagonal r.

    Writes a PNG at ``path`` (parents created) and returns it. NaN cells (zero-variance categories) read "n/a".
    """
    n = len(result.corr_candidates)
    side = max(3.2, 0.55 * n + 1.5)
    fig = _new_figure(2 * side + 0.8, side + 0.4)
    axes = fig.subplots(1, 2)
    annotate = n <= 14
    _heatmap(
        axes[0],
        result.corr_candidates,
        f"candidates: mean r = {result.mean_r_candidates:.2f} (|r| {result.mean_abs_r_candidates:.2f})",
        annotate,
    )
    im = _heatmap(
        axes[1],
        result.corr_soups,
        f"soups: mean r = {result.mean_r_soups:.2f} (|r| {result.mean_abs_r_soups:.2f})",
        annotate,
    )
    fig.colorbar(im, ax=list(axes), label="Pearson r", shrink=0.8)
    sup = f"category correlation, {result.n_pairs} pairs"
    if result.excluded:
        sup += f"; excluded (zero variance): {', '.join(result.excluded)}"
    fig.suptitle(sup, fontsize=9)
    return _save(fig, path)


def shapley_figure(result: ShapleyResult, path: str | Path) -> Path:
    """Horizontal bars of the Shapley values, largest on top; 95% error bars (1.96 stderr) when sampled.

    Writes a PNG at ``path`` (parents created) and returns it.
    """
    df = result.to_frame().iloc[::-1]  # barh draws bottom-up
    fig = _new_figure(6.4, 1.2 + 0.38 * max(len(df), 1))
    ax = fig.subplots()
    colors = ["tab:blue" if v >= 0 else "tab:red" for v in df["shapley"]]
    xerr = 1.96 * df["stderr"].fillna(0.0).to_numpy() if result.method == "sampled" else None
    ax.barh([str(i) for i in df.index], df["shapley"], xerr=xerr, color=colors, capsize=3)
    ax.axvline(0.0, color="black", lw=0.8)
    ends = df["shapley"] + np.sign(df["shapley"]) * (0.0 if xerr is None else xerr)
    for y, (v, end) in enumerate(zip(df["shapley"], ends, strict=True)):
        ax.annotate(
            f"{v:.3g}",
            (end, y),
            xytext=(4 if v >= 0 else -4, 0),
            textcoords="offset points",
            ha="left" if v >= 0 else "right",
            va="center",
            fontsize=8,
        )
    how = "exact" if result.method == "exact" else f"sampled, {result.n_permutations} permutations, 95% CI"
    ax.set_title(
        f"Shapley values ({how}; {result.evaluations} soups evaluated)\n"
        f"sum = v(all) - v(empty) = {result.grand_value - result.empty_value:.3g}",
        fontsize=9,
    )
    ax.set_xlabel("contribution to the soup's score")
    ax.margins(x=0.15)
    return _save(fig, path)


def weights_figure(weights_by_strategy: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Soup weights per strategy: one stacked horizontal bar per strategy (one colour per candidate, weights
    >= 0.06 labelled); grouped bars instead if any weight is negative. Missing weights count as 0.

    Writes a PNG at ``path`` (parents created) and returns it.
    """
    df = pd.DataFrame({s: dict(w) for s, w in weights_by_strategy.items()}).T.fillna(0.0).astype(float)
    if df.empty:
        raise ValueError("weights_figure needs at least one strategy with weights")
    strategies, cands = [str(s) for s in df.index], [str(c) for c in df.columns]
    cmap = _colors(len(cands))
    stacked = bool((df >= 0).all().all())
    per_row = 0.45 if stacked else 0.15 * len(cands) + 0.2
    fig = _new_figure(7.5, 1.4 + per_row * len(strategies))
    ax = fig.subplots()
    y = np.arange(len(strategies))[::-1]
    if stacked:
        left = np.zeros(len(df))
        for j, c in enumerate(cands):
            w = df.iloc[:, j].to_numpy()
            ax.barh(y, w, left=left, color=cmap[j], label=c, edgecolor="white", lw=0.5)
            for yi, li, wi in zip(y, left, w, strict=True):
                if wi >= 0.06:
                    ax.text(li + wi / 2, yi, f"{wi:.2f}", ha="center", va="center", fontsize=7)
            left += w
        ax.set_xlabel("soup weight (stacked)")
    else:
        h = 0.8 / len(cands)
        for j, c in enumerate(cands):
            ax.barh(y + 0.4 - h * (j + 0.5), df.iloc[:, j], height=h, color=cmap[j], label=c)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_xlabel("soup weight")
    ax.set_yticks(y, strategies)
    ax.set_title("soup weights per strategy", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def _colors(k: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def scores_figure(table: pd.DataFrame, path: str | Path, overall: str = "overall") -> Path:
    """Comparison table (rows: strategies; columns: categories and ``overall``, any one unit) as two panels:
    bars of ``overall`` (the best in bold) next to a heatmap of the categories, annotated with the scores and
    coloured within each column from its worst (light) to its best (dark) row. Without an ``overall`` column
    the bars show the mean over categories.

    Writes a PNG at ``path`` (parents created) and returns it.
    """
    if table.empty:
        raise ValueError("scores_figure needs a non-empty table")
    cats = [c for c in table.columns if c != overall]
    scores = table[cats].astype(float)
    if overall in table.columns:
        tot, tot_label = table[overall].astype(float), str(overall)
    else:
        tot, tot_label = scores.mean(axis=1), "mean over categories"
    rows = [str(r) for r in table.index]
    n, k = len(rows), len(cats)
    fig = _new_figure(5.0 + 0.75 * max(k, 1), 1.5 + 0.42 * n)
    ax_bar, ax_map = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3.0, max(0.75 * k, 1.0)]})
    y = np.arange(n)
    best = int(np.nanargmax(tot.to_numpy())) if tot.notna().any() else -1
    ax_bar.barh(y, tot, color=["tab:orange" if i == best else "tab:blue" for i in range(n)])
    finite = tot[np.isfinite(tot)]
    lo = float(finite.min()) if len(finite) else 0.0
    hi = float(finite.max()) if len(finite) else 1.0
    pad = (hi - lo) * 0.35 or abs(hi) * 0.05 or 1.0
    ax_bar.set_xlim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
    for i, v in enumerate(tot):
        if np.isfinite(v):
            ax_bar.text(v, i, f" {v:.2f}", va="center", fontsize=8, fontweight="bold" if i == best else "normal")
    ax_bar.set_yticks(y, rows)
    ax_bar.set_title(f"{tot_label}\n(best highlighted)", fontsize=9)
    if k:
        vals = scores.to_numpy()
        span = np.nanmax(vals, axis=0) - np.nanmin(vals, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(span > 0, (vals - np.nanmin(vals, axis=0)) / span, 0.5)
        ax_map.imshow(rel, cmap="Greens", vmin=-0.15, vmax=1.15, aspect="auto")
        col_max = np.nanmax(np.where(np.isfinite(vals), vals, -np.inf), axis=0)
        for i, j in np.ndindex(n, k):
            v, dark = vals[i, j], bool(np.isfinite(rel[i, j]) and rel[i, j] > 0.7)
            weight = "bold" if v == col_max[j] and span[j] > 0 else "normal"
            text = "n/a" if not np.isfinite(v) else f"{v:.1f}"
            ax_map.text(
                j, i, text, ha="center", va="center", fontsize=7, fontweight=weight, color="white" if dark else "black"
            )
        ax_map.set_xticks(range(k), [str(c) for c in cats], rotation=45, ha="right", fontsize=8)
        ax_map.set_title("per category\n(shade: best in column darkest)", fontsize=9)
        ax_map.set_yticks(y, [""] * n)
    else:
        ax_map.set_axis_off()
    for ax in (ax_bar, ax_map):
        ax.set_ylim(n - 0.5, -0.5)  # first row on top, rows aligned across the panels
    return _save(fig, path)
