"""Write the example benchmark's JSONL files (committed; run again to regenerate the same bytes).

    python examples/own_benchmark/make_data.py

Three categories, one per lm-eval output type, in the format the demo zoo's models read (character-level,
``"<op> <operand>="``), so that the demo's tiny checkpoints score something on them:

- ``mirror`` (generate_until, exact_match): ``"rev abc="`` -> ``"cba"``
- ``times4`` (multiple_choice, acc): ``"quad 12="``, choices ``["48", "44", "84", "52"]``, label = index of 4n
- ``swap`` (loglikelihood, acc): ``"swap abcd="`` -> ``"badc"``
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {"dev": 20, "test": 30}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 5)))


def mirror(rng: random.Random) -> dict:
    w = _word(rng)
    return {"prompt": f"rev {w}=", "target": w[::-1]}


def times4(rng: random.Random) -> dict:
    n = rng.randint(10, 999)
    right = str(4 * n)
    wrong = {str(4 * n + d) for d in (-4, 4, 40)} | {right[::-1]}
    choices = [right, *sorted(wrong - {right})][:4]
    rng.shuffle(choices)
    return {"prompt": f"quad {n}=", "choices": choices, "label": choices.index(right)}


def swap(rng: random.Random) -> dict:
    w = _word(rng)
    return {"prompt": f"swap {w}=", "target": "".join(w[i:i + 2][::-1] for i in range(0, len(w), 2))}


def main() -> None:
    seen: set[str] = set()
    for name, make in (("mirror", mirror), ("times4", times4), ("swap", swap)):
        rng = random.Random(f"own-{name}")
        for split, n in SIZES.items():
            rows = []
            while len(rows) < n:
                row = make(rng)
                if row["prompt"] not in seen:  # dev and test disjoint
                    seen.add(row["prompt"])
                    rows.append({"id": f"{name}-{split}-{len(rows)}", **row})
            (HERE / "data" / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
