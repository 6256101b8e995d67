"""The demo benchmark: small synthetic skills in three families, as local JSONL + lm-eval task YAMLs.

Every item is a pair (prompt, target) of plain strings. A model answers by continuing the prompt
character by character; scoring is exact match of the whole target (lm-eval ``acc`` of a
loglikelihood request = the target is the greedy continuation).

Families (categories inside a family share a skill, so their scores move together):

- ``arith``:  ``half`` (n // 2), ``quad`` (4n), ``tri`` (3n) of a 5-10 digit number n
- ``string``: ``rev`` (reverse a word), ``sort`` (sort its letters), ``swap`` (swap adjacent letters)
- ``cipher``: ``enc`` / ``dec`` (a secret letter substitution drawn from the seed, and its inverse)

Examples: ``"quad 47215=" -> "188860"``, ``"sort dcab=" -> "abcd"``, ``"swap abcde=" -> "badce"``.

Dev, test and training items are drawn from the same distribution and are pairwise disjoint
(training samplers reject every prompt that occurs in dev or test).
"""

from __future__ import annotations

import json
import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Item = tuple[str, str]
LETTERS = string.ascii_lowercase
DIGITS = string.digits
# Every character a prompt or target may contain (the tokenizer's vocabulary is built from it).
ALPHABET = DIGITS + LETTERS + " +-*="


@dataclass(frozen=True)
class Category:
    """One benchmark category: a name, its family and an item generator ``make(rng, table) -> item``."""

    name: str
    family: str
    make: Callable[[random.Random, dict[str, str]], Item]


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


# Difficulty knobs: inclusive ranges of operand digits / word lengths; each item draws its size
# uniformly from the range, so a category mixes easy and hard items and its accuracy grows gradually.
NUM_LEN = (5, 10)
STR_LEN = (3, 8)
SORT_LEN = (4, 10)
CIPHER_LEN = (4, 10)


def _number(rng: random.Random) -> int:
    d = rng.randint(*NUM_LEN)
    return rng.randint(10 ** (d - 1), 10**d - 1)


def _times(k: int, tag: str) -> Callable[[random.Random, dict[str, str]], Item]:
    """Items ``"{tag} n=" -> str(k * n)``."""

    def make(rng: random.Random, table: dict[str, str]) -> Item:
        n = _number(rng)
        return f"{tag} {n}=", str(k * n)

    return make


def _half(rng: random.Random, table: dict[str, str]) -> Item:
    n = _number(rng)
    return f"half {n}=", str(n // 2)


def _rev(rng: random.Random, table: dict[str, str]) -> Item:
    w = _word(rng, *STR_LEN)
    return f"rev {w}=", w[::-1]


def _sort(rng: random.Random, table: dict[str, str]) -> Item:
    w = _word(rng, *SORT_LEN)
    return f"sort {w}=", "".join(sorted(w))


def _swap(rng: random.Random, table: dict[str, str]) -> Item:
    w = _word(rng, *STR_LEN)
    return f"swap {w}=", "".join(w[i : i + 2][::-1] for i in range(0, len(w), 2))


def _enc(rng: random.Random, table: dict[str, str]) -> Item:
    w = _word(rng, *CIPHER_LEN)
    return f"enc {w}=", "".join(table[c] for c in w)


def _dec(rng: random.Random, table: dict[str, str]) -> Item:
    w = _word(rng, *CIPHER_LEN)
    inverse = {v: k for k, v in table.items()}
    return f"dec {w}=", "".join(inverse[c] for c in w)


def _copy(rng: random.Random, table: dict[str, str]) -> Item:
    w = _word(rng, *CIPHER_LEN)
    return f"copy {w}=", w


def _dup(rng: random.Random, table: dict[str, str]) -> Item:
    w = _word(rng, *STR_LEN)
    return f"dup {w}=", w + w


CATEGORIES: tuple[Category, ...] = (
    Category("half", "arith", _half),
    Category("quad", "arith", _times(4, "quad")),
    Category("tri", "arith", _times(3, "tri")),
    Category("rev", "string", _rev),
    Category("sort", "string", _sort),
    Category("swap", "string", _swap),
    Category("enc", "cipher", _enc),
    Category("dec", "cipher", _dec),
)
# Generic skills outside the benchmark: part of the base's pretraining mixture, and what the off-target
# candidate is fine-tuned on.
OFFBENCH: tuple[Category, ...] = (Category("copy", "offbench", _copy), Category("dup", "offbench", _dup))
BY_NAME: dict[str, Category] = {c.name: c for c in CATEGORIES}
_ALL: dict[str, Category] = {c.name: c for c in CATEGORIES + OFFBENCH}
FAMILIES: dict[str, str] = {c.name: c.family for c in CATEGORIES}
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


def make_eval_items(seed: int, category: str, sizes: dict[str, int]) -> dict[str, list[Item]]:
    """Draw ``sizes[split]`` distinct items per split for one category; splits are pairwise disjoint."""
    rng, table = _rng(seed, category, "eval"), cipher_table(seed)
    make = BY_NAME[category].make
    seen: set[str] = set()
    out: dict[str, list[Item]] = {}
    for split in SPLITS:
        items: list[Item] = []
        while len(items) < sizes[split]:
            prompt, target = make(rng, table)
            if prompt not in seen:
                seen.add(prompt)
                items.append((prompt, target))
        out[split] = items
    return out


class TrainSampler:
    """Endless stream of training items of one category, never repeating a dev/test prompt."""

    def __init__(self, seed: int, category: str, exclude: set[str], stream: str = "train") -> None:
        self.rng, self.table = _rng(seed, category, stream), cipher_table(seed)
        self.make, self.exclude = _ALL[category].make, exclude

    def __call__(self) -> Item:
        while True:
            prompt, target = self.make(self.rng, self.table)
            if prompt not in self.exclude:
                return prompt, target


def knobs() -> dict[str, object]:
    """The difficulty knobs in force (part of the zoo's cache fingerprint)."""
    return {
        "num": NUM_LEN, "str": STR_LEN, "sort": SORT_LEN, "cipher": CIPHER_LEN,
        "categories": [c.name for c in CATEGORIES], "offbench": [c.name for c in OFFBENCH],
    }


def write_benchmark(
    root: Path, seed: int, sizes: dict[str, int], data_root: Path | None = None
) -> tuple[Path, dict[str, dict[str, list[Item]]]]:
    """Write ``root/data/{category}_{split}.jsonl`` and ``root/tasks/*.yaml`` (one lm-eval task per
    category x split). The YAMLs name the data files by absolute path under ``data_root`` (default
    ``root``: pass the final folder when ``root`` is a staging folder that will be renamed).
    Returns the task folder and the items (category -> split -> items)."""
    data_root = (data_root or root).resolve()
    data_dir, task_dir = root / "data", root / "tasks"
    data_dir.mkdir(parents=True, exist_ok=True)
    task_dir.mkdir(parents=True, exist_ok=True)
    items = {c.name: make_eval_items(seed, c.name, sizes) for c in CATEGORIES}
    for cat, per_split in items.items():
        for split, rows in per_split.items():
            path = data_dir / f"{cat}_{split}.jsonl"
            with path.open("w") as f:
                for i, (prompt, target) in enumerate(rows):
                    f.write(json.dumps({"id": i, "prompt": prompt, "target": target}) + "\n")
            name = TASK_TEMPLATE.format(category=cat, split=split)
            (task_dir / f"{name}.yaml").write_text(task_yaml(name, data_root / "data" / path.name, FAMILIES[cat]))
    return task_dir, items


def task_yaml(name: str, data_file: Path, family: str) -> str:
    """lm-eval 0.4 task config: greedy exact match of ``target`` after ``prompt`` (no delimiter)."""
    return (
        f"task: {name}\n"
        f"tag: [soce_demo, soce_demo_{family}]\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{target}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def read_items(path: str | Path) -> list[Item]:
    """Read (prompt, target) pairs back from one of the JSONL files."""
    with Path(path).open() as f:
        return [(r["prompt"], r["target"]) for r in map(json.loads, f)]
