"""The built-in demo zoo: a shared base, fine-tuned candidates and a correlation population.

``build_demo(DemoConfig())`` trains everything locally from the seed (no downloads) and returns a
manifest; a finished zoo is cached under ``{root}/{preset}-seed{seed}`` and reused.

Recipe (all models are character-level Llamas sharing one tokenizer and one architecture):

- ``base``: trained on an even mixture of all categories plus two generic off-benchmark skills (copy,
  duplicate), on fresh items only (never a dev/test prompt);
- candidates (:data:`RECIPES`): fine-tunes of the base on different mixtures, of uneven quality like a
  real leaderboard: three family specialists, a two-family model, a narrow two-skill model, and two
  off-target models trained hard on the off-benchmark skills (weak, and far from the others: they are
  what drags a uniform soup of *all* candidates below the best single one);
- population: checkpoints saved at 1/4, 1/2 and 3/4 of every on-target fine-tune plus three short
  single-category fine-tunes; used for the category correlation analysis (the candidates are not in it;
  nor are off-target checkpoints, whose collapse on every category would mask the family structure).

Calibration (seeds 0-2, ``cpu`` preset shape, measured on a GPU with the self-check of
:mod:`soce.demo.selfcheck`): weighted soup of dev-selected experts > best single > uniform soup of all.
The generation categories (``tri``, ``sort``, ``dec``: see :mod:`soce.demo.tasks`) are trained like the
others (the target followed by ``<eos>``), so they keep that calibration; through lm-eval, seed 0,
``make run`` (2 torch threads): test overall 47.62 (weighted) > 45.32 (best single) > 32.48 (uniform of
all); 45.92 (uniform of the experts). The thread count changes float rounding, hence the trained zoo: with
1 thread, 47.70 > 44.62 > 33.22, and 46.55.

Presets: ``cpu`` (the demo), ``gpu`` (larger models), ``small`` (the cpu zoo with shorter training), ``fast``
(debug=fast, ``make smoke`` and the end-to-end tests: 0.14M-param models, shorter items, 6 candidates;
candidates differ and experts differ, but its soups are too weak for the paper's orderings to be
reliable) and ``tiny`` (mechanics only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from soce.config import DemoConfig
from soce.demo import tasks
from soce.demo.train import ModelShape, TrainSpec, make_model, make_tokenizer, set_threads, train

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: generate_until categories, per-preset knobs, manifest 'outputs'


@dataclass(frozen=True)
class Recipe:
    """One fine-tune from the base. ``mix``: family or category name -> relative weight (``"*"`` =
    every benchmark category); ``steps`` as a fraction of the preset's fine-tune steps; ``lr`` as a
    multiple of the preset's fine-tune learning rate; ``keep``: step fractions saved into the population;
    ``candidate``: whether the final checkpoint is a candidate (else it joins the population)."""

    name: str
    mix: Mapping[str, float]
    steps: float = 1.0
    lr: float = 1.0
    keep: tuple[float, ...] = (0.25, 0.5, 0.75)
    candidate: bool = True


RECIPES: tuple[Recipe, ...] = (
    # candidates: three family specialists and a two-family model (all replaying 30% of the benchmark),
    # a narrow two-skill model, and two off-target models trained hard on skills outside the benchmark
    Recipe("arith-pro", {"arith": 1.0, "*": 0.3}),
    Recipe("string-pro", {"string": 1.0, "*": 0.3}),
    Recipe("cipher-pro", {"cipher": 1.0, "*": 0.3}, steps=0.6),
    Recipe("arith-string", {"arith": 1.0, "string": 1.0, "*": 0.3}),
    Recipe("tri-sort", {"tri": 1.0, "sort": 1.0}, steps=0.6),
    Recipe("offtarget", {"offbench": 1.0, "*": 0.05}, steps=0.6, lr=5.0, keep=()),
    Recipe("offtarget-b", {"offbench": 1.0, "sort": 0.3}, steps=0.6, lr=5.0, keep=()),
    # population only: short single-category fine-tunes
    Recipe("pop-half", {"half": 1.0}, steps=0.3, keep=(0.5,), candidate=False),
    Recipe("pop-swap", {"swap": 1.0}, steps=0.3, keep=(0.5,), candidate=False),
    Recipe("pop-dec", {"dec": 1.0}, steps=0.3, keep=(0.5,), candidate=False),
)


# The fast zoo: the same recipes less one off-target candidate, one population checkpoint per fine-tune.
FAST_RECIPES: tuple[Recipe, ...] = tuple(
    dataclasses.replace(r, keep=r.keep[:0] if not r.keep else (0.5,)) for r in RECIPES if r.name != "offtarget-b"
)


@dataclass(frozen=True)
class Preset:
    """Sizes of one preset: items per split and category, model shape, base and fine-tune schedules."""

    sizes: Mapping[str, int]
    shape: ModelShape
    base_steps: int
    base_batch: int
    base_lr: float
    ft_steps: int
    ft_batch: int
    ft_lr: float
    recipes: tuple[Recipe, ...] = RECIPES
    base_mix: Mapping[str, float] = field(default_factory=lambda: {"*": 1.0, "offbench": 0.5})
    eval_batch: int = 256
    knobs: tasks.Knobs = tasks.Knobs()
    threads: int | None = None  # torch threads while building (None: every core; 1 is faster for tiny models)


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        sizes={"dev": 200, "test": 500},
        shape=ModelShape(hidden=128, layers=4, heads=4, mlp=512, max_len=64),
        base_steps=500,
        base_batch=64,
        base_lr=2e-3,
        ft_steps=200,
        ft_batch=32,
        ft_lr=4e-4,
    ),
    "tiny": Preset(  # mechanics only (seconds): models barely trained, scores near 0
        sizes={"dev": 40, "test": 60},
        shape=ModelShape(hidden=32, layers=2, heads=2, mlp=64, max_len=64),
        base_steps=40,
        base_batch=16,
        base_lr=3e-3,
        ft_steps=12,
        ft_batch=8,
        ft_lr=1e-3,
        threads=1,
    ),
    "small": Preset(  # the cpu zoo, shorter training, 40/60 items per split (~10 min on 2 cores)
        sizes={"dev": 40, "test": 60},
        shape=ModelShape(hidden=128, layers=4, heads=4, mlp=512, max_len=64),
        base_steps=300,
        base_batch=64,
        base_lr=2e-3,
        ft_steps=120,
        ft_batch=32,
        ft_lr=4e-4,
    ),
    "fast": Preset(  # debug=fast, `make smoke`, end-to-end tests: 0.14M params, shorter items, ~20 s on 2 cores
        sizes={"dev": 40, "test": 60},
        shape=ModelShape(hidden=64, layers=2, heads=2, mlp=256, max_len=64),
        base_steps=400,
        base_batch=32,
        base_lr=3e-3,
        ft_steps=80,
        ft_batch=32,
        ft_lr=1e-3,
        recipes=FAST_RECIPES,
        threads=1,
        knobs=tasks.Knobs(num=(2, 4), str=(2, 5), sort=(2, 6), cipher=(2, 6)),
    ),
    "gpu": Preset(
        sizes={"dev": 200, "test": 500},
        shape=ModelShape(hidden=512, layers=8, heads=8, mlp=2048, max_len=64),
        base_steps=300,
        base_batch=128,
        base_lr=6e-4,
        ft_steps=150,
        ft_batch=64,
        ft_lr=1.5e-4,
    ),
}


def zoo_dir(cfg: DemoConfig) -> Path:
    """Absolute folder of the zoo of ``cfg``."""
    return (Path(cfg.root) / f"{cfg.preset}-seed{cfg.seed}").resolve()


def mixture(mix: Mapping[str, float]) -> dict[str, float]:
    """Expand a recipe mix (families, categories, ``"*"``, ``"offbench"``) to category -> weight."""
    out: dict[str, float] = {}
    for key, w in mix.items():
        if key == "*":
            names = [c.name for c in tasks.CATEGORIES]
        elif key == "offbench":
            names = [c.name for c in tasks.OFFBENCH]
        elif key in tasks.BY_NAME:
            names = [key]
        else:
            names = [c.name for c in tasks.CATEGORIES if c.family == key]
            if not names:
                raise ValueError(f"unknown family or category {key!r} in a demo recipe")
        for n in names:
            out[n] = out.get(n, 0.0) + w
    return out


def _device(cfg: DemoConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if cfg.preset == "gpu" and torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def train_zoo(
    cfg: DemoConfig, items: Mapping[str, Mapping[str, list[tasks.Item]]], progress: bool = True
) -> Iterator[tuple[str, str, torch.nn.Module]]:
    """Train the zoo of ``cfg``; yields ``(role, name, model)`` with role in base/candidate/population,
    each model in eval mode and only valid until the next item is requested (save or score it)."""
    p = PRESETS[cfg.preset]
    device = _device(cfg)
    exclude = {c: {q for split in v.values() for q, _ in split} for c, v in items.items()}
    names = [c.name for c in tasks.CATEGORIES + tasks.OFFBENCH]
    samplers = {c: tasks.TrainSampler(cfg.seed, c, exclude.get(c, set()), knobs=p.knobs) for c in names}
    bar = _Progress(p, progress)

    bar.stage("base")
    base = make_model(p.shape, cfg.seed).to(device)
    spec = TrainSpec(p.base_steps, p.base_batch, p.base_lr, mixture(p.base_mix), seed=cfg.seed)
    train(base, spec, samplers, on_step=bar.step)
    yield "base", "base", base
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}

    for i, r in enumerate(p.recipes):
        bar.stage(r.name)
        model = base
        model.load_state_dict(base_state)
        steps = max(2, round(r.steps * p.ft_steps))
        keep = {max(1, round(f * steps)): f for f in r.keep}
        spec = TrainSpec(
            steps,
            p.ft_batch,
            r.lr * p.ft_lr,
            mixture(r.mix),
            warmup=max(1, steps // 10),
            final_lr_frac=0.5,
            save_at=tuple(sorted(keep)),
            seed=cfg.seed * 1000 + i + 1,
        )
        saved: list[tuple[int, dict[str, torch.Tensor]]] = []
        train(model, spec, samplers, on_save=lambda s, m, saved=saved: saved.append((s, _copy(m))), on_step=bar.step)
        final = _copy(model)
        for s, state in saved:
            model.load_state_dict(state)
            yield "population", f"{r.name}-step{s:04d}", model
        model.load_state_dict(final)
        yield ("candidate" if r.candidate else "population"), r.name, model
    bar.close()


def _copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Progress:
    """A tqdm bar over all optimizer steps of a build (or nothing when ``enabled`` is false)."""

    def __init__(self, p: Preset, enabled: bool) -> None:
        total = p.base_steps + sum(max(2, round(r.steps * p.ft_steps)) for r in p.recipes)
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="demo zoo", unit="step", mininterval=1.0)

    def stage(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def step(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fingerprint(cfg: DemoConfig) -> str:
    """Hash of everything that determines the zoo (config, preset, recipes, task knobs, format)."""
    p = PRESETS[cfg.preset]
    blob = json.dumps(
        {
            "seed": cfg.seed,
            "preset": cfg.preset,
            "format": FORMAT_VERSION,
            "p": asdict(p) | {"recipes": [asdict(r) for r in p.recipes]},
            "knobs": tasks.knobs(p.knobs),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_manifest(path: Path, fingerprint: str) -> dict | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("fingerprint") == fingerprint else None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Build (or reuse from cache) the demo and return its manifest (also ``manifest.json`` in the zoo
    folder): ``dir``, ``categories``, ``families`` (category -> family), ``outputs`` (category -> lm-eval
    output type), ``splits``, ``task_dir``, ``task_template`` (``"soce_demo_{category}_{split}"``), ``base``,
    ``candidates`` and ``population`` (name -> checkpoint folder); all paths absolute.

    Safe to call from several processes at once: a file lock serialises builders, the build happens in
    a temporary sibling folder that is renamed into place when complete, and a finished zoo whose
    fingerprint matches the config is returned without rebuilding. A build that was killed (even with
    SIGKILL, which runs no clean-up) leaves its staging folder behind; the next builder, holding the lock
    and hence sure that no other build is alive, removes it before starting from scratch.
    """
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown demo preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    out = zoo_dir(cfg)
    fingerprint = _fingerprint(cfg)
    if (m := _read_manifest(out, fingerprint)) is not None:
        return m
    with _lock(out.parent / f".{out.name}.lock"):
        if (m := _read_manifest(out, fingerprint)) is not None:
            return m
        remove_leftovers(out)
        t0 = time.time()
        with _build_settings(PRESETS[cfg.preset]) as threads:
            log.info("building demo zoo %s (preset %s, seed %d, %d threads)", out, cfg.preset, cfg.seed, threads)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            try:
                manifest = _build_into(cfg, tmp, out, progress)
                manifest["fingerprint"] = fingerprint
                manifest["build_seconds"] = round(time.time() - t0, 1)
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
                if out.exists():  # a stale zoo (other fingerprint or no manifest): replace it
                    shutil.rmtree(out)
                os.replace(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("demo zoo built in %.1f s: %s", time.time() - t0, out)
        return manifest


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the staging folders of interrupted builds of zoo ``out`` (call with the build lock held);
    returns what was removed."""
    stale = sorted(out.parent.glob(f".{out.name}.tmp-*"))
    for path in stale:
        log.warning("removing the staging folder of an interrupted demo build: %s", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextlib.contextmanager
def _build_settings(p: Preset) -> Iterator[int]:
    """While building: the preset's torch thread count and no transformers progress bars (one per saved
    checkpoint); both restored afterwards. Yields the thread count."""
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield set_threads(p.threads)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _build_into(cfg: DemoConfig, tmp: Path, final: Path, progress: bool) -> dict:
    """Write data, tasks and checkpoints into ``tmp``; paths in the returned manifest point at ``final``."""
    p = PRESETS[cfg.preset]
    _, items = tasks.write_benchmark(tmp, cfg.seed, dict(p.sizes), data_root=final, knobs=p.knobs)
    tokenizer = make_tokenizer(p.shape.max_len)
    paths: dict[str, dict[str, str]] = {"base": {}, "candidate": {}, "population": {}}
    folders = {"base": "", "candidate": "candidates", "population": "population"}
    for role, name, model in train_zoo(cfg, items, progress):
        rel = Path(folders[role]) / name if role != "base" else Path("base")
        model.save_pretrained(tmp / rel)
        tokenizer.save_pretrained(tmp / rel)
        paths[role][name] = str(final / rel)
    return {
        "dir": str(final),
        "seed": cfg.seed,
        "preset": cfg.preset,
        "categories": [c.name for c in tasks.CATEGORIES],
        "families": dict(tasks.FAMILIES),
        "outputs": dict(tasks.OUTPUTS),
        "splits": list(tasks.SPLITS),
        "task_dir": str(final / "tasks"),
        "task_template": tasks.TASK_TEMPLATE,
        "base": paths["base"]["base"],
        "candidates": paths["candidate"],
        "population": paths["population"],
        "sizes": dict(p.sizes),
        "params": sum(t.numel() for t in model.parameters()),
    }
