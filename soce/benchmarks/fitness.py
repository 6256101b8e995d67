"""Can these models run this benchmark? Checked before any evaluation, in seconds.

A model whose context is shorter than the benchmark's prompts does not fail: transformers warns once,
then generation runs past the model's positions, slowly, with memory growing, and scores 0. A model
whose tokenizer lacks the chat markup a prompt format writes (``<|eot_id|>`` ...) reads that markup
as plain text. :func:`check_fitness` compares, for every model a job may load:

- the longest prompt of the items the job uses (tokens, by the model's tokenizer) plus the new tokens
  a generation may add, against the model's context length (as lm-eval resolves it);
- the special tokens the benchmark's prompt format writes, against the tokenizer's vocabulary.

Backends describe what they ask of a model with ``evaluator.demands(splits) -> list[Demand]`` (a backend
without it is not checked). Each failure is one line naming the models and the fix.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soce.config import ConfigError

log = logging.getLogger(__name__)

LONGEST = 4  # prompts per category whose tokens are counted (the longest by characters)


@dataclass(frozen=True)
class Demand:
    """What one category asks of a model: its longest prompts (text scored or continued, longest first, at
    most :data:`LONGEST`), the new tokens a generation may add, and special tokens the prompt format writes
    (each must be one token of the vocabulary)."""

    category: str
    prompts: tuple[str, ...]
    new_tokens: int = 0
    special: tuple[str, ...] = ()
    fix: str = ""  # what to change besides the pool, e.g. "another benchmark.options.handler"


def longest(texts: list[str], k: int = LONGEST) -> tuple[str, ...]:
    """The ``k`` longest of ``texts`` by characters (a cheap stand-in before tokenising)."""
    return tuple(sorted(texts, key=len, reverse=True)[:k])


def demands_of(evaluator: Any, splits: list[str]) -> list[Demand]:
    """The backend's demands on the items of ``splits``; [] when the backend does not describe them."""
    fn = getattr(evaluator, "demands", None)
    return fn(splits) if fn is not None else []


def context_length(path: str) -> int:
    """A checkpoint's context length in tokens, as lm-eval resolves it (config, then tokenizer, then 2048)."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig

    return int(resolve_max_length(AutoConfig.from_pretrained(path, trust_remote_code=False), _tokenizer(path)))


def check_fitness(evaluator: Any, models: dict[str, str], splits: list[str]) -> None:
    """ConfigError (one line) when a model of ``models`` (name -> checkpoint) cannot run the benchmark's items
    of ``splits``; models sharing a context length and tokenizer are checked, and named, together. Every
    problem is logged, one line each; the first is raised."""
    demands = demands_of(evaluator, splits)
    if not demands:
        return
    groups: dict[tuple[int, str], list[str]] = {}
    for name, path in models.items():
        groups.setdefault((context_length(path), _tokenizer_key(path)), []).append(name)
    problems = []
    for (ctx, _), names in groups.items():
        tok = _tokenizer(models[names[0]])
        problems += [p for d in demands if (p := _problem(d, tok, ctx, names))]
    for p in problems[1:]:
        log.error("%s", p)
    if problems:
        more = f" (and {len(problems) - 1} more, logged above)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


def _problem(d: Demand, tok: Any, ctx: int, names: list[str]) -> str | None:
    """One line naming the models, the category and the fix, or None when they fit ``d``."""
    who = f"model{'s' * (len(names) > 1)} {', '.join(names)}"
    vocab = tok.get_vocab()
    missing = [t for t in d.special if t not in vocab]
    if missing:
        return (f"{who}: the tokenizer has no token {', '.join(missing)}, which the prompt format of category "
                f"{d.category!r} writes; use models trained on that format (another pool)"
                + (f" or {d.fix}" if d.fix else ""))
    tokens = max(len(tok(p, add_special_tokens=True)["input_ids"]) for p in d.prompts) if d.prompts else 0
    if tokens + d.new_tokens <= ctx:
        return None
    fix = "use models with a longer context (another pool)"
    if tokens < ctx:
        fix = f"set benchmark.max_new_tokens={ctx - tokens} or less, or " + fix
    drop = f", or leave category {d.category!r} out of benchmark.categories"
    return (f"{who}: a prompt of category {d.category!r} is {tokens:,} tokens, + {d.new_tokens:,} new tokens > "
            f"the model's context of {ctx:,} tokens; {fix}{drop}")


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer_key(path: str) -> str:
    """Checkpoints whose tokenizer files are byte-identical share one key (one base: one tokenizer)."""
    p = Path(path)
    files = sorted(f for f in p.glob("*") if f.is_file() and (f.name.startswith(("tokenizer", "vocab", "merges",
                                                                                "special_tokens"))))
    if not files:
        return str(path)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _tokenizer(path: str) -> Any:
    key = _tokenizer_key(path)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return _TOKENIZERS[key]
