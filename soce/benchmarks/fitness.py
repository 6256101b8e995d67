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
    """ConfigError (one line) when a model of ``models`` (name -> checkpoint, candidates first) cannot run the
    benchmark's items of ``splits``. Models sharing a context length and tokenizer are checked, and named,
    together: at most one line per group for the context, one for the chat markup. Every problem is logged;
    the first is raised."""
    demands = demands_of(evaluator, splits)
    if not demands:
        return
    groups: dict[tuple[int, str], list[str]] = {}
    for name, path in models.items():
        groups.setdefault((context_length(path), _tokenizer_key(path)), []).append(name)
    problems = []
    for (ctx, _), names in groups.items():
        tok = _tokenizer(models[names[0]])
        problems += [p for p in (_too_long(demands, tok, ctx, names), _no_markup(demands, tok, names)) if p]
    for p in problems[1:]:
        log.error("%s", p)
    if problems:
        more = f" (and {len(problems) - 1} more, logged above)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


def _who(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"model{'s' * (len(names) > 1)} {shown}"


def _too_long(demands: list[Demand], tok: Any, ctx: int, names: list[str]) -> str | None:
    """One line when a prompt plus its new tokens exceeds the context ``ctx`` (the worst category named)."""
    need = {
        d.category: (max((len(tok(p, verbose=False)["input_ids"]) for p in d.prompts), default=0), d.new_tokens)
        for d in demands
    }
    over = [c for c, (n, new) in need.items() if n + new > ctx]
    if not over:
        return None
    worst = max(over, key=lambda c: sum(need[c]))
    tokens, new = need[worst]
    fix = "use models with a longer context (another pool)"
    if tokens < ctx:
        fix = f"set benchmark.max_new_tokens={ctx - tokens} or less, or " + fix
    return (
        f"{_who(names)}: a prompt of category {worst!r} is {tokens:,} tokens + {new:,} new tokens, more than "
        f"the models' context of {ctx:,} tokens ({len(over)} of {len(demands)} categories do not fit); {fix}, "
        f"or leave those categories out of benchmark.categories"
    )


def _no_markup(demands: list[Demand], tok: Any, names: list[str]) -> str | None:
    """One line when the prompt format writes special tokens the tokenizer does not have."""
    vocab = tok.get_vocab()
    missing = sorted({t for d in demands for t in d.special if t not in vocab})
    if not missing:
        return None
    fixes = sorted({d.fix for d in demands if d.fix})
    return (
        f"{_who(names)}: the tokenizer has no {', '.join(missing)}, which the benchmark's prompt format writes "
        f"(the models were not trained on it); use models trained on that chat format (another pool)"
        + "".join(f", or {f}" for f in fixes)
    )


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer_key(path: str) -> str:
    """Checkpoints whose tokenizer files are byte-identical share one key (one base: one tokenizer)."""
    p = Path(path)
    files = sorted(
        f
        for f in p.glob("*")
        if f.is_file() and (f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")))
    )
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
