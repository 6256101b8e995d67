"""Measured GPU cost of BFCL v3 evaluations at Llama-3.1-8B shapes: today's padded HF ``generate`` vs the engine.

    python bench/bfcl_cost.py --subset --full single,multi   # 8B shapes, bf16, on the GPU (random weights)
    python bench/bfcl_cost.py --tiny --subset --full multi   # tiny shapes on the CPU (a smoke test)

Random weights never emit the stop token, so every model call is driven by the ground truth (``--force``, on by
default): the response is the entry's ground-truth answer (tests/bfcl_oracle.py writes it as the handler's format
expects) then ``<|eot_id|>``, fed one decode step per token as free generation would; multi-turn follows the
ground-truth path with the real executed tool results. Token counts, steps and batch shapes are those of a model
that answers right (BFCL's checkers then score ~100%: a sanity check). Nothing is projected:

* ``--subset``: ``--items`` entries of every single-turn category and ``--multi`` multi-turn entries (first
  questions unique), evaluated by the baseline (soce's previous path: HF ``generate`` in padded rounds of
  ``--batch`` queries) and by the engine, in this one process; the speedup is the ratio of their minutes.
* ``--full single`` / ``--full multi``: every entry of the 13 single-turn / 4 multi-turn categories on the engine.

Per run: minutes, model calls, tokens prefilled (and reused from a kept KV cache) and decoded, steps, peak GPU
memory, and the ratios to the hardware's limits measured here at start (a device copy for HBM bandwidth, a bf16
matmul for peak FLOP/s): decode time / ((weights + live KV) bytes per step / bandwidth), prefill time /
((2 x non-embedding parameters + attention) FLOPs / peak). JSON goes to ``--out``/bfcl_cost.json after each run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bfcl_oracle import Oracle, first_user, messages  # noqa: E402

from soce.benchmarks import bfcl_gen  # noqa: E402
from soce.benchmarks.bfcl import CATEGORIES, MULTI_TURN, Evaluator, load_category  # noqa: E402
from soce.config import BenchmarkConfig  # noqa: E402

SINGLE = [c for c in CATEGORIES if c not in MULTI_TURN]
POINTS, RACE_EVALS = 37, 13 / 2.07  # the paper's grid; search=race: ~13 GPU-h at 2.07 GPU-h per evaluation
SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]
SHAPES = {
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=131072,
    ),
}


def tokenizer(vocab: int, per_category: int, path: str | None) -> Any:
    """A byte-level BPE with the Llama-3 special tokens trained on BFCL texts (loaded from ``path`` if it exists,
    else trained and saved there)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if path and Path(path).is_file():
        tok = Tokenizer.from_file(path)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        texts = [json.dumps(e) for c in CATEGORIES for e in load_category(c)[0][:per_category]]
        tok.train_from_iterator(
            texts,
            trainers.BpeTrainer(
                vocab_size=vocab,
                special_tokens=SPECIAL,
                show_progress=False,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        if path:
            tok.save(path)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def model(shape: str, vocab: int, device: str) -> Any:
    """A random-weight Llama of ``shape`` built directly on ``device`` (bf16 on CUDA, fp32 on the CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = LlamaConfig(**{**SHAPES[shape], "vocab_size": max(vocab, SHAPES[shape]["vocab_size"])}, dtype=dtype)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def hardware(device: str) -> dict[str, float]:
    """Measured limits: HBM bandwidth (bytes read + written per second, a 4 GiB device copy) and bf16 FLOP/s
    (an 8192^3 matmul); medians of 5 after a warm-up. Nominal values on the CPU (ratios are then meaningless)."""
    import torch

    if not device.startswith("cuda"):
        return {"hbm_bytes_per_s": 1e10, "bf16_flop_per_s": 1e11}
    a, b = (
        torch.empty(2**31, dtype=torch.bfloat16, device=device),
        torch.empty(2**31, dtype=torch.bfloat16, device=device),
    )
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)

    def median(fn: Any) -> float:
        fn()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[2]

    out = {
        "hbm_bytes_per_s": 2 * a.numel() * 2 / median(lambda: b.copy_(a)),
        "bf16_flop_per_s": 2 * 8192**3 / median(lambda: x @ x),
    }
    a = b = x = None
    torch.cuda.empty_cache()
    return out


class Forcer(Oracle):
    """The ground truth as forced tokens; an entry is found by id (the engine's thread knows it) or, for the
    baseline's rounds, by its first question (the subset keeps those unique)."""

    def __init__(self, ids: dict[str, list[str]], tok: Any, eot: int) -> None:
        super().__init__({})
        self.tok, self.eot, self.by_id = tok, eot, {}
        for c, wanted in ids.items():
            entries, answers = load_category(c)
            for i, e in enumerate(entries):
                if e["id"] not in wanted:
                    continue
                truth = answers[i]["ground_truth"] if answers else None
                self.by_id[e["id"]] = (e, truth)
                self.by_question.setdefault(first_user(e), (e, truth))

    def tokens(self, prompt: str, entry_id: str | None = None) -> list[int]:
        return self.tok(self.text(prompt, entry_id), add_special_tokens=False)["input_ids"] + [self.eot]

    def text(self, prompt: str, entry_id: str | None = None) -> str:
        msgs = messages(prompt)
        users = [i for i, (role, _) in enumerate(msgs) if role == "user"]
        entry, truth = self.by_id[entry_id] if entry_id else self.by_question[msgs[users[0]][1]]
        return self.reply(msgs, users, entry, truth)


def subset(per_category: int, multi: int) -> dict[str, list[str]]:
    """Evenly spread ids: ``per_category`` of each single-turn category, ``multi`` multi-turn entries (spread over
    the 4 categories); no two entries share a first question (the baseline's forcing finds entries by it)."""
    seen, out = set(), {}
    want = {
        **dict.fromkeys(SINGLE, per_category),
        **{c: multi // 4 + (i < multi % 4) for i, c in enumerate(MULTI_TURN)},
    }
    for c, n in want.items():
        entries = load_category(c)[0]
        step = max(1, len(entries) // max(n, 1))
        picked = []
        for e in entries[::step] + entries:
            if len(picked) < n and first_user(e) not in seen and e["id"] not in picked:
                seen.add(first_user(e))
                picked.append(e["id"])
        out[c] = picked
    return {c: v for c, v in out.items() if v}


def forced_hf(lm: Any, tok: Any, forcer: Forcer, settings: Any, log: dict) -> Any:
    """The baseline: soce's previous generation (``hf_generator``: padded HF ``generate`` in chunks) with a logits
    processor that forces each row's ground truth; per generate call: rows, prompt tokens, steps, seconds."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    table: dict[tuple, list[int]] = {}
    argmax: dict[tuple, list[int]] = log.setdefault("argmax", {})

    class Force(LogitsProcessor):
        def __init__(self, rows: list[tuple], start: int) -> None:
            width = max(len(table[r]) for r in rows)
            pad = [table[r] + [table[r][-1]] * (width - len(table[r])) for r in rows]
            self.rows, self.start = rows, start
            self.forced = torch.tensor(pad, device=lm.device)

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            step = min(input_ids.shape[1] - self.start, self.forced.shape[1] - 1)
            for r, a in zip(self.rows, scores.argmax(-1).tolist(), strict=True):
                argmax.setdefault(r, []).append(a)
            return torch.full_like(scores, -float("inf")).scatter_(1, self.forced[:, step : step + 1], 0.0)

    class Proxy:
        device = lm.device

        def parameters(self) -> Any:
            return lm.parameters()

        def generate(self, input_ids: Any, attention_mask: Any, **kw: Any) -> Any:
            rows = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask, strict=True)]
            procs = LogitsProcessorList([Force(rows, input_ids.shape[1])])
            return lm.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=procs, **kw)

    base = bfcl_gen.hf_generator(Proxy(), tok, settings)

    def generate(prompts: list[str]) -> list[Any]:
        for p in prompts:
            table[tuple(tok(p, add_special_tokens=False)["input_ids"])] = forcer.tokens(p)
        _sync()
        t = time.perf_counter()
        out = base(prompts)
        _sync()
        log.setdefault("calls", []).append(
            (len(out), sum(g.prompt_tokens for g in out), max(g.new_tokens for g in out), time.perf_counter() - t)
        )
        return out

    return generate


def forced_engine(engine: Any, tok: Any, forcer: Forcer, settings: Any) -> Any:
    """The engine's generator, each query forced to its entry's ground truth (the entry from the worker thread)."""

    def force(prompt: str) -> list[int]:
        session = getattr(bfcl_gen._CURRENT, "session", None)
        return forcer.tokens(prompt, session.split("/", 1)[1] if session else None)

    return bfcl_gen.EngineGenerator(engine, tok, settings, force=force)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def evaluate(generate: Any, ids: dict[str, list[str]], batch: int, new_tokens: int) -> dict[str, Any]:
    """One evaluation of ``ids`` (BFCL's own loops and checkers): wall minutes, peak memory, accuracy."""
    import torch

    bench = BenchmarkConfig(
        name="bfcl_v3",
        categories=list(ids),
        backend="bfcl",
        select_split="test",
        report_split="test",
        batch_size=batch,
        options={"max_new_tokens": new_tokens},
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    scores = Evaluator(bench).score_with(generate, "test", ids)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "entries": sum(map(len, ids.values())),
        "minutes": wall / 60,
        "peak_gib": peak,
        "accuracy": {c: scores[c] for c in ids},
        "samples": scores["samples"],
    }


def engine_figures(stats: Any, engine: Any, lm: Any, hw: dict[str, float]) -> dict[str, Any]:
    """Tokens, steps and the ratios to the floors from the engine's counters of one run."""
    c = lm.config
    params = sum(p.numel() for p in lm.parameters())
    embed = lm.model.embed_tokens.weight.numel()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    weight_bytes = (params - embed) * next(lm.parameters()).dtype.itemsize  # every decode step reads them once
    from soce.benchmarks.generation import kv_bytes_per_token

    decode_floor = (stats.decode_steps * weight_bytes + stats.decode_kv_tokens * kv_bytes_per_token(lm)) / hw[
        "hbm_bytes_per_s"
    ]
    flops = (
        2 * (params - embed - lm.lm_head.weight.numel()) * stats.prefill_padded
        + 4 * c.num_hidden_layers * c.num_attention_heads * head_dim * stats.prefill_attn
    )
    prefill_floor = flops / hw["bf16_flop_per_s"]
    return {
        "prefill_tokens": stats.prefill_tokens,
        "prefill_padded_tokens": stats.prefill_padded,
        "reused_kv_tokens": stats.reused_tokens,
        "prefill_passes": stats.prefill_passes,
        "prefill_s": stats.prefill_s,
        "prefill_tokens_per_s": stats.prefill_tokens / max(stats.prefill_s, 1e-9),
        "prefill_vs_flop_floor": stats.prefill_s / max(prefill_floor, 1e-12),
        "decode_steps": stats.decode_steps,
        "decoded_tokens": stats.decode_tokens,
        "mean_rows_per_step": stats.decode_tokens / max(stats.decode_steps, 1),
        "mean_live_kv_tokens_per_step": stats.decode_kv_tokens / max(stats.decode_steps, 1),
        "decode_s": stats.decode_s,
        "decode_ms_per_step": 1e3 * stats.decode_s / max(stats.decode_steps, 1),
        "decode_vs_hbm_floor": stats.decode_s / max(decode_floor, 1e-12),
        "preempted": stats.preempted,
        "evicted_sessions": stats.evicted,
        "slots": engine.slots,
        "kv_pool_tokens": engine.pool.pages * engine.page,
        "page": engine.page,
    }


class LoggedEngineGenerator(bfcl_gen.EngineGenerator):
    """Records each query's argmax tokens (by prompt token ids) for the comparison with the baseline."""

    argmax: dict

    def result(self, req: Any) -> Any:
        self.argmax[tuple(req.ids)] = list(req.argmax)
        return super().result(req)


def engine_run(engine: Any, tok: Any, forcer: Forcer, settings: Any, ids: dict, hw: dict, lm: Any) -> dict:
    """One evaluation on the engine, with its figures and the argmax tokens of every query."""
    import dataclasses

    def force(prompt: str) -> list[int]:
        session = getattr(bfcl_gen._CURRENT, "session", None)
        return forcer.tokens(prompt, session.split("/", 1)[1] if session else None)

    gen = LoggedEngineGenerator(engine, tok, settings, force=force)
    gen.argmax = {}
    before = dataclasses.replace(engine.stats)
    run = evaluate(gen, ids, engine.slots, settings.max_new_tokens)
    delta = dataclasses.replace(engine.stats)
    for f in dataclasses.fields(delta):
        setattr(delta, f.name, getattr(engine.stats, f.name) - getattr(before, f.name))
    return {**run, **engine_figures(delta, engine, lm, hw), "_argmax": gen.argmax}


def baseline_figures(log: dict) -> dict[str, Any]:
    calls = log.get("calls", [])
    gen_s = sum(c[3] for c in calls)
    return {
        "generate_calls": len(calls),
        "rows": sum(c[0] for c in calls),
        "prompt_tokens": sum(c[1] for c in calls),
        "decode_steps": sum(c[2] for c in calls),
        "generate_s": gen_s,
    }


def compare(base: dict, new: dict) -> dict[str, Any]:
    """Queries whose argmax tokens (under the same forced inputs) differ, and verdicts that differ."""
    common = [k for k in new if k in base]
    differ = [k for k in common if base[k][: len(new[k])] != new[k]]
    positions = sum(len(new[k]) for k in common)
    wrong = sum(a != b for k in common for a, b in zip(base[k][: len(new[k])], new[k], strict=False))
    return {
        "queries_compared": len(common),
        "queries_with_differing_argmax": len(differ),
        "argmax_positions": positions,
        "differing_argmax_positions": wrong,
    }


def warm_up(engine: Any, tok: Any) -> float:
    """Compile the decode step and the prefill lengths (seconds): short and long prompts, free generation."""
    from soce.benchmarks.generation import Request

    t = time.perf_counter()
    for n, rows in ((300, 2), (3000, 3), (300, 2)):
        ids = tok("<|begin_of_text|>" + " call(x=1)" * (n // 4), add_special_tokens=False)["input_ids"][:n]
        engine.generate([Request(ids, 8, frozenset()) for _ in range(rows)])
    _sync()
    return time.perf_counter() - t


def setup(a: argparse.Namespace) -> tuple[Any, Any, Any, dict]:
    """(tokenizer, model, device, summary head) for the arguments."""
    import torch
    import transformers

    device = a.device or ("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    t0 = time.perf_counter()
    tok = tokenizer(a.vocab or (1024 if a.tiny else 32000), 2 if a.tiny else 60, a.tokenizer)
    lm = model("tiny" if a.tiny else "8b", len(tok), device)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    head = {
        "device": name,
        "shape": "tiny" if a.tiny else "8b",
        "date": datetime.date.today().isoformat(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bfcl_eval": bfcl_gen.bfcl_sdk.BFCL_VERSION,
            "python": sys.version.split()[0],
        },
        "forced_ground_truth": True,
        "max_new_tokens": a.max_new_tokens,
        "setup_s": time.perf_counter() - t0,
        "hardware": hardware(device),
    }
    try:
        import triton

        head["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    return tok, lm, device, head


def run_subset(a: argparse.Namespace, tok: Any, lm: Any, engines: Any, forcer: Forcer, head: dict, save: Any) -> None:
    """Baseline then engine on the same subset, in this process: the single-turn part, then the multi-turn part
    (each part's figures are saved as soon as they exist; the engine is dropped before the second baseline so
    the baseline has the memory it had in the first)."""
    ids = subset(a.items, a.multi)
    out = head.setdefault("subset", {"items": {c: len(v) for c, v in ids.items()}})
    parts = {
        "single_turn": {c: v for c, v in ids.items() if c in SINGLE},
        "multi_turn": {c: v for c, v in ids.items() if c in MULTI_TURN},
    }
    for name, part in ((n, p) for n, p in parts.items() if p):
        baseline = not a.skip_baseline and name in a.baseline_parts.split(",")
        if baseline:
            engines.drop()
        out[name] = subset_part(a, tok, lm, engines, Forcer(part, tok, forcer.eot), part, baseline)
        save()
    done = [out[n] for n in parts if "speedup" in out.get(n, {})]
    if len(done) == sum(1 for p in parts.values() if p):
        out["speedup"] = sum(d["baseline"]["minutes"] for d in done) / sum(d["engine"]["minutes"] for d in done)
    save()


def subset_part(
    a: argparse.Namespace, tok: Any, lm: Any, engines: Any, forcer: Forcer, ids: dict, baseline: bool
) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from soce.benchmarks.bfcl_gen import GenSettings

    settings, out, base_argmax = GenSettings(max_new_tokens=a.max_new_tokens), {}, {}
    head = engines.head
    if baseline:
        log: dict = {}
        try:  # no cuDNN attention: its graph fails to execute on some padded multi-turn batches (torch 2.11)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                out["baseline"] = {
                    **evaluate(forced_hf(lm, tok, forcer, settings, log), ids, a.batch, a.max_new_tokens),
                    **baseline_figures(log),
                    "batch": a.batch,
                }
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # recorded; the engine still runs
            out["baseline"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        base_argmax = log.get("argmax", {})
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        print(f"baseline done: {out['baseline'].get('minutes')} min", flush=True)
    try:
        new = engine_run(engines.get(), tok, forcer, settings, ids, head["hardware"], lm)
    except Exception:  # noqa: BLE001 - recorded: the baseline's figures stay useful
        import traceback

        out["engine"] = {"error": traceback.format_exc()[-3000:]}
        head.setdefault("errors", []).append(out["engine"]["error"])
        return out
    out["engine"] = {k: v for k, v in new.items() if k != "_argmax"}
    print(f"engine done: {out['engine']['minutes']:.3f} min", flush=True)
    if "minutes" in out.get("baseline", {}):
        out["speedup"] = out["baseline"]["minutes"] / out["engine"]["minutes"]
        out["argmax_vs_baseline"] = compare(base_argmax, new["_argmax"])
        b, n = out["baseline"]["samples"], out["engine"]["samples"]
        out["differing_verdicts"] = sum(x != y for c in b for x, y in zip(b[c], n[c], strict=True))
    return out


class Engines:
    """The one engine of the run, built (and warmed up) on first use; dropped to give its memory back."""

    def __init__(self, lm: Any, tok: Any, a: argparse.Namespace, head: dict) -> None:
        self.lm, self.tok, self.a, self.head, self.engine = lm, tok, a, head, None

    def get(self) -> Any:
        from soce.benchmarks.generation import Engine, EngineConfig

        if self.engine is None:
            self.engine = Engine(self.lm, EngineConfig(slots=self.a.slots, chunk=self.a.chunk), tokenizer=self.tok)
            self.head.setdefault("engine_warm_up_s", []).append(warm_up(self.engine, self.tok))
        return self.engine

    def drop(self) -> None:
        import gc

        import torch

        if self.engine is None:
            return
        self.engine = None
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_full(
    part: str, a: argparse.Namespace, tok: Any, lm: Any, engine: Any, forcer: Forcer, head: dict, save: Any
) -> None:
    from soce.benchmarks.bfcl_gen import GenSettings

    cats = SINGLE if part == "single" else list(MULTI_TURN)
    if a.categories:  # a part split over several calls (each under the device's 10-minute limit)
        cats = [c for c in cats if c in a.categories.split(",")]
    ids = {c: [e["id"] for e in load_category(c)[0]] for c in cats}
    if a.limit:
        ids = {c: v[: a.limit] for c, v in ids.items()}
    forcer = Forcer(ids, tok, forcer.eot)
    new = engine_run(engine, tok, forcer, GenSettings(max_new_tokens=a.max_new_tokens), ids, head["hardware"], lm)
    key = "single_turn" if part == "single" else "multi_turn"
    print(f"{key} done: {new['minutes']:.2f} min", flush=True)
    head[key] = {"measured": True, **{k: v for k, v in new.items() if k not in ("_argmax", "samples")}}
    save()


def summarise(head: dict) -> None:
    st, mt = head.get("single_turn", {}), head.get("multi_turn", {"measured": False})
    head.setdefault("multi_turn", mt)
    full = [st.get("entries") == 3641 and st, mt.get("entries") == 800 and mt]
    if all(full):
        head["full_eval_minutes"] = st["minutes"] + mt["minutes"]
        head["grid_gpu_hours"] = POINTS * head["full_eval_minutes"] / 60
        head["race_gpu_hours"] = RACE_EVALS * head["full_eval_minutes"] / 60
    head["speedup_vs_previous"] = head.get("subset", {}).get("speedup")


def brief(head: dict) -> dict[str, Any]:
    """The summary without per-item samples (the last line printed)."""
    keep = (
        "minutes",
        "entries",
        "peak_gib",
        "decode_ms_per_step",
        "decode_vs_hbm_floor",
        "prefill_tokens_per_s",
        "prefill_vs_flop_floor",
        "mean_rows_per_step",
        "generate_calls",
        "speedup",
        "argmax_vs_baseline",
        "differing_verdicts",
        "error",
        "reused_kv_tokens",
        "queries_compared",
        "queries_with_differing_argmax",
        "argmax_positions",
        "differing_argmax_positions",
        "prefill_tokens",
        "decoded_tokens",
        "decode_steps",
    )

    def small(d: Any) -> Any:
        if not isinstance(d, dict):
            return d
        return {
            k: small(v) for k, v in d.items() if k in keep or isinstance(v, dict) and k not in ("samples", "accuracy")
        }

    return {
        k: small(v) if k in ("subset", "single_turn", "multi_turn") else v for k, v in head.items() if k != "errors"
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    p.add_argument("--device", default=None)
    p.add_argument("--subset", action="store_true", help="baseline and engine on the same subset")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--baseline-parts", default="single_turn,multi_turn", help="subset parts the baseline runs")
    p.add_argument("--full", default="", help="comma-separated: single, multi (every entry, engine only)")
    p.add_argument("--limit", type=int, default=None, help="cap entries per category of --full (smoke tests)")
    p.add_argument("--categories", default="", help="comma-separated: only these categories of --full's parts")
    p.add_argument("--items", type=int, default=16, help="subset: entries per single-turn category")
    p.add_argument("--multi", type=int, default=40, help="subset: multi-turn entries")
    p.add_argument("--batch", type=int, default=32, help="baseline: queries per generate round")
    p.add_argument("--slots", type=int, default=None, help="engine: rows (default 256 on CUDA)")
    p.add_argument("--chunk", type=int, default=None, help="engine: prefill tokens per pass (default 8192)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary (default 32000; tiny 1024)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to load, or to save the trained one to")
    p.add_argument(
        "--start-full-within",
        type=float,
        default=None,
        help="seconds: a --full part starts only this soon after the script began (device time)",
    )
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "bfcl_cost"))
    a = p.parse_args(argv)
    began = time.perf_counter()
    tok, lm, device, head = setup(a)
    forcer = Forcer({}, tok, tok.convert_tokens_to_ids("<|eot_id|>"))
    Path(a.out).mkdir(parents=True, exist_ok=True)

    def save() -> None:
        summarise(head)
        Path(a.out, "bfcl_cost.json").write_text(json.dumps(head, indent=1, default=str))

    engines = Engines(lm, tok, a, head)
    if a.subset:
        run_subset(a, tok, lm, engines, forcer, head, save)
    for part in [x for x in a.full.split(",") if x]:
        if a.start_full_within is not None and time.perf_counter() - began > a.start_full_within:
            head.setdefault("skipped", []).append(part)
            continue
        run_full(part, a, tok, lm, engines.get(), forcer, head, save)
    save()
    print(json.dumps(brief(head), default=str))
    return head


if __name__ == "__main__":
    main()
