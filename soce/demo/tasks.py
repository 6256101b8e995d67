"""The demo benchmark: small synthetic skills in three families, as local JSONL + lm-eval task YAMLs.

Every item is a pair (prompt, target) of plain strings. A model answers by continuing the prompt
character by character. Two kinds of category (:attr:`Category.output`), as in real benchmarks:

- ``loglikelihood``: lm-eval ``acc`` of a loglikelihood request (the target is the greedy continuation,
  scored in one forward pass);
- ``generate_until``: the model generates greedily until a stop sequence (or ``<eos>``, or
  ``max_gen_toks`` characters); ``acc`` is exact match of the generated answer (:func:`process_results`),
  so a model must also stop at the right place.

Families (categories inside a family share a skill, so their scores move together); generation
categories are marked (gen):

- ``arith``:  ``half`` (n // 2), ``quad`` (4n), ``tri`` (3n, gen) of a 5-10 digit number n
- ``string``: ``rev`` (reverse a word), ``sort`` (sort its letters, gen), ``swap`` (swap adjacent letters)
- ``cipher``: ``enc`` / ``dec`` (a secret letter substitution drawn from the seed, and its inverse; dec gen)

Examples: ``"quad 47215=" -> "188860"``, ``"sort dcab=" -> "abcd"``, ``"swap abcde=" -> "badce"``.
Sizes (digits, word lengths) are :class:`Knobs`; a preset may shrink them (the ``fast`` zoo does).

Dev, test and training items are drawn from the same distribution and are pairwise disjoint
(training samplers reject every prompt that occurs in dev or test).
"""

from __future__ import annotations

import json
import random
import string
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Item = tuple[str, str]
LETTERS = string.ascii_lowercase
DIGITS = string.digits
# Every character a prompt or target may contain (the tokenizer's vocabulary is built from it).
ALPHABET = DIGITS + LETTERS + " +-*="


@dataclass(frozen=True)
class Knobs:
    """Difficulty: inclusive ranges of operand digits / word lengths. Each item draws its size uniformly
    from the range, so a category mixes easy and hard items and its accuracy grows gradually."""

    num: tuple[int, int] = (5, 10)
    str: tuple[int, int] = (3, 8)
    sort: tuple[int, int] = (4, 10)
    cipher: tuple[int, int] = (4, 10)


@dataclass(frozen=True)
class Ctx:
    """What an item generator reads besides its random stream: the cipher table and the knobs."""

    table: dict[str, str]
    knobs: Knobs = field(default_factory=Knobs)


Make = Callable[[random.Random, Ctx], Item]
LOGLIKELIHOOD, GENERATE = "loglikelihood", "generate_until"


@dataclass(frozen=True)
class Category:
    """One benchmark category: a name, its family, an item generator ``make(rng, ctx) -> item`` and its
    lm-eval output type (:data:`LOGLIKELIHOOD` or :data:`GENERATE`)."""

    name: str
    family: str
    make: Make
    output: str = LOGLIKELIHOOD


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _number(rng: random.Random, ctx: Ctx) -> int:
    d = rng.randint(*ctx.knobs.num)
    return rng.randint(10 ** (d - 1), 10**d - 1)


def _times(k: int, tag: str) -> Make:
    """Items ``"{tag} n=" -> str(k * n)``."""

    def make(rng: random.Random, ctx: Ctx) -> Item:
        n = _number(rng, ctx)
        return f"{tag} {n}=", str(k * n)

    return make


def _half(rng: random.Random, ctx: Ctx) -> Item:
    n = _number(rng, ctx)
    return f"half {n}=", str(n // 2)


def _rev(rng: random.Random, ctx: Ctx) -> Item:
    w = _word(rng, *ctx.knobs.str)
    return f"rev {w}=", w[::-1]


def _sort(rng: random.Random, ctx: Ctx) -> Item:
    w = _word(rng, *ctx.knobs.sort)
    return f"sort {w}=", "".join(sorted(w))


def _swap(rng: random.Random, ctx: Ctx) -> Item:
    w = _word(rng, *ctx.knobs.str)
    return f"swap {w}=", "".join(w[i : i + 2][::-1] for i in range(0, len(w), 2))


def _enc(rng: random.Random, ctx: Ctx) -> Item:
    w = _word(rng, *ctx.knobs.cipher)
    return f"enc {w}=", "".join(ctx.table[c] for c in w)


def _dec(rng: random.Random, ctx: Ctx) -> Item:
    w = _word(rng, *ctx.knobs.cipher)
    inverse = {v: k for k, v in ctx.table.items()}
    return f"dec {w}=", "".join(inverse[c] for c in w)


def _copy(rng: random.Random, ctx: Ctx) -> Item:
    w = _word(rng, *ctx.knobs.cipher)
    return f"copy {w}=", w


def _dup(rng: random.Random, ctx: Ctx) -> Item:
    w = _word(rng, *ctx.knobs.str)
    return f"dup {w}=", w + w


CATEGORIES: tuple[Category, ...] = (
    Category("half", "arith", _half),
    Category("quad", "arith", _times(4, "quad")),
    Category("tri", "arith", _times(3, "tri"), GENERATE),
    Category("rev", "string", _rev),
    Category("sort", "string", _sort, GENERATE),
    Category("swap", "string", _swap),
    Category("enc", "cipher", _enc),
    Category("dec", "cipher", _dec, GENERATE),
)
# Generic skills outside the benchmark: part of the base's pretraining mixture, and what the off-target
# candidate is fine-tuned on.
OFFBENCH: tuple[Category, ...] = (Category("copy", "offbench", _copy), Category("dup", "offbench", _dup))
BY_NAME: dict[str, Category] = {c.name: c for c in CATEGORIES}
_ALL: dict[str, Category] = {c.name: c for c in CATEGORIES + OFFBENCH}
FAMILIES: dict[str, str] = {c.name: c.family for c in CATEGORIES}
OUTPUTS: dict[str, str] = {c.name: c.output for c in CATEGORIES}
SPLITS: tuple[str, ...] = ("dev", "test")
TASK_TEMPLATE = "soce_demo_{category}_{split}"


def cipher_table(seed: int) -> dict[str, str]:
    """The secret letter substitution of the ``cipher`` family (a permutation without fixed points)."""
    rng = random.Random(seed * 7919 + 17)
    while True:
        perm = rng.sample(LETTERS, len(LETTERS))
        if all(a != b for a, b in zip(LETTERS, perm, strict=True)):
            return dict(zip(LETTERS, perm, strict=True))


def _rng(seed: int, category: str, stream: str) -> random.Random:
    return random.Random((seed << 32) ^ zlib.crc32(f"{category}/{stream}".encode()))


def make_eval_items(seed: int, category: str, sizes: dict[str, int], knobs: Knobs = Knobs()) -> dict[str, list[Item]]:
    """Draw ``sizes[split]`` distinct items per split for one category; splits are pairwise disjoint."""
    rng, ctx = _rng(seed, category, "eval"), Ctx(cipher_table(seed), knobs)
    make = BY_NAME[category].make
    seen: set[str] = set()
    out: dict[str, list[Item]] = {}
    for split in SPLITS:
        items: list[Item] = []
        while len(items) < sizes[split]:
            prompt, target = make(rng, ctx)
            if prompt not in seen:
                seen.add(prompt)
                items.append((prompt, target))
        out[split] = items
    return out


class TrainSampler:
    """Endless stream of training items of one category, never repeating a dev/test prompt."""

    def __init__(
        self, seed: int, category: str, exclude: set[str], stream: str = "train", knobs: Knobs = Knobs()
    ) -> None:
        self.rng, self.ctx = _rng(seed, category, stream), Ctx(cipher_table(seed), knobs)
        self.make, self.exclude = _ALL[category].make, exclude

    def __call__(self) -> Item:
        while True:
            prompt, target = self.make(self.rng, self.ctx)
            if prompt not in self.exclude:
                return prompt, target


def knobs(k: Knobs = Knobs()) -> dict[str, object]:
    """The task definitions in force (part of the zoo's cache fingerprint): knobs, categories and their
    output types, the task YAML and generation settings."""
    return {
        **asdict(k),
        "categories": [[c.name, c.family, c.output] for c in CATEGORIES],
        "offbench": [c.name for c in OFFBENCH],
        "yaml": task_yaml("x", Path("x"), "f", GENERATE, 1) + task_yaml("x", Path("x"), "f", LOGLIKELIHOOD, 1),
    }


def write_benchmark(
    root: Path, seed: int, sizes: dict[str, int], data_root: Path | None = None, knobs: Knobs = Knobs()
) -> tuple[Path, dict[str, dict[str, list[Item]]]]:
    """Write ``root/data/{category}_{split}.jsonl`` and ``root/tasks/*.yaml`` (one lm-eval task per
    category x split). The YAMLs name the data files by absolute path under ``data_root`` (default
    ``root``: pass the final folder when ``root`` is a staging folder that will be renamed).
    Returns the task folder and the items (category -> split -> items)."""
    data_root = (data_root or root).resolve()
    data_dir, task_dir = root / "data", root / "tasks"
    data_dir.mkdir(parents=True, exist_ok=True)
    task_dir.mkdir(parents=True, exist_ok=True)
    items = {c.name: make_eval_items(seed, c.name, sizes, knobs) for c in CATEGORIES}
    for cat, per_split in items.items():
        longest = max(len(t) for rows in per_split.values() for _, t in rows)
        for split, rows in per_split.items():
            path = data_dir / f"{cat}_{split}.jsonl"
            with path.open("w") as f:
                for i, (prompt, target) in enumerate(rows):
                    f.write(json.dumps({"id": i, "prompt": prompt, "target": target}) + "\n")
            name = TASK_TEMPLATE.format(category=cat, split=split)
            yaml = task_yaml(name, data_root / "data" / path.name, FAMILIES[cat], OUTPUTS[cat], longest + GEN_SLACK)
            (task_dir / f"{name}.yaml").write_text(yaml)
    return task_dir, items


# Generation settings of the generate_until categories: stop at a space or "=" (never part of an answer;
# lm-eval adds the tokenizer's <eos>), and at most the longest target of the category + GEN_SLACK characters.
GEN_UNTIL: tuple[str, ...] = (" ", "=")
GEN_SLACK = 2


def task_yaml(name: str, data_file: Path, family: str, output: str = LOGLIKELIHOOD, max_gen_toks: int = 16) -> str:
    """lm-eval 0.4 task config with metric ``acc`` (exact match): for ``loglikelihood``, the target is the
    greedy continuation of ``prompt`` (no delimiter); for ``generate_until``, the greedy generation (stopped
    by :data:`GEN_UNTIL`, ``<eos>`` or ``max_gen_toks``) equals the target (:func:`process_results`)."""
    head = (
        f"task: {name}\n"
        f"tag: [soce_demo, soce_demo_{family}, soce_demo_{output}]\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        f"output_type: {output}\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{target}}"\n'
        'target_delimiter: ""\n'
    )
    if output == GENERATE:
        head += (
            "generation_kwargs:\n"
            f"  until: {json.dumps(list(GEN_UNTIL))}\n"
            "  do_sample: false\n"
            "  temperature: 0.0\n"
            f"  max_gen_toks: {max_gen_toks}\n"
            "process_results: !function soce.demo.tasks.process_results\n"
        )
    elif output != LOGLIKELIHOOD:
        raise ValueError(f"unknown output type {output!r}")
    return head + (
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 2.0\n"
    )


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` of the generation categories: ``acc`` is 1.0 when the generated text
    (already cut at the stop sequences by lm-eval), stripped of surrounding whitespace, equals the target."""
    return {"acc": float(results[0].strip() == doc["target"])}


def read_items(path: str | Path) -> list[Item]:
    """Read (prompt, target) pairs back from one of the JSONL files."""
    with Path(path).open() as f:
        return [(r["prompt"], r["target"]) for r in map(json.loads, f)]
