"""GPU cost of BFCL v3 evaluations: per-point evaluation time at Llama-3.1-8B shapes.

    python bench/bfcl_cost.py                        # 8B shapes, bf16, on the GPU (random weights, no hub)
    python bench/bfcl_cost.py --tiny                 # tiny shapes on the CPU (a smoke test, seconds)

What runs: soce's BFCL backend (real BFCL prompts through bfcl-eval's handlers and loops, soce's batched HF
generate, bfcl-eval's checkers) on ``--items`` items of every single-turn category, for each batch size in
``--batch-sizes``, twice: with 1 new token (prefill throughput) and with ``--max-new-tokens`` (random
weights never emit <|eot_id|>, so every query decodes that many steps: an upper bound per step count).
The tokenizer is a byte-level BPE trained here on BFCL's own texts with the Llama-3 special tokens (an
approximation of Llama-3's 128k vocabulary: its token counts are reported next to the notes' 3.2M).

Projections (GPU-hours of one full BFCL v3 evaluation and of the paper's 37-point grid):
  single-turn (measured rates): prompt tokens of all 3,491 items (per-category means x counts) / prefill
    tokens/s + ceil(3,491 / batch) x steps x measured decode step time;
  multi-turn (NOT measured: projected from the token counts in the reference notes, 51-65M prompt tokens
    and 6-8k generate calls per model, at the measured single-turn rates; long multi-turn prompts prefill
    slower than short ones, so this is a lower bound).
Prints a JSON summary as its last line (also written to ``--out``/bfcl_cost.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soce.benchmarks.bfcl import CATEGORIES, MULTI_TURN, Evaluator, load_category  # noqa: E402
from soce.benchmarks.bfcl_gen import Generation, GenSettings, hf_generator  # noqa: E402
from soce.config import BenchmarkConfig  # noqa: E402

SINGLE = [c for c in CATEGORIES if c not in MULTI_TURN]
POINTS = 37  # the paper's grid for 3 experts: 36 points of the 0.1 grid + the uniform point
NOTES_SINGLE_PROMPT_TOKENS = 3.2e6  # bfcl-notes.md: single-turn, 3,491 calls, Llama-3 tokenizer
NOTES_MULTI = {"prompt_tokens": (51e6, 65e6), "calls": (6e3, 8e3)}  # bfcl-notes.md: per model
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|eom_id|>", "<|python_tag|>"]
SHAPES = {"8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072),
          "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, max_position_embeddings=32768)}


def tokenizer(vocab: int, per_category: int) -> Any:
    """A byte-level BPE with the Llama-3 special tokens, trained on ``per_category`` BFCL entries of each
    category (function docs and questions, as the prompts hold them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.dumps(e) for c in CATEGORIES for e in load_category(c)[0][:per_category]]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
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


def items(per_category: int) -> dict[str, list[str]]:
    """``per_category`` ids spread evenly over each single-turn category."""
    out = {}
    for c in SINGLE:
        ids = [e["id"] for e in load_category(c)[0]]
        out[c] = ids[:: max(1, len(ids) // per_category)][:per_category]
    return out


def prompt_tokens(tok: Any, chosen: dict[str, list[str]]) -> dict[str, float]:
    """Mean prompt tokens per item of each category (the real formatted prompts; no model runs)."""
    means = {}
    for c, ids in chosen.items():
        counts: list[int] = []

        def record(prompts: list[str], counts: list[int] = counts) -> list[Generation]:
            counts += [len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]]
            return [Generation("no call", 1, 1) for _ in prompts]

        Evaluator(bench([c], 64, 1)).score_with(record, "test", {c: ids})
        means[c] = sum(counts) / len(counts)
    return means


def bench(categories: list[str], batch: int, new_tokens: int) -> BenchmarkConfig:
    return BenchmarkConfig(name="bfcl_v3", categories=categories, backend="bfcl", select_split="test",
                           report_split="test", batch_size=batch, options={"max_new_tokens": new_tokens})


def timed_run(lm: Any, tok: Any, chosen: dict[str, list[str]], batch: int, new_tokens: int) -> dict[str, Any]:
    """One evaluation of ``chosen`` at ``batch``; generate calls timed (device synchronised)."""
    import torch

    generate = hf_generator(lm, tok, GenSettings(max_new_tokens=new_tokens))
    calls: list[tuple[int, int, int, float]] = []  # rows, prompt tokens, new tokens, seconds

    def timed(prompts: list[str]) -> list[Generation]:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t = time.perf_counter()
        out = generate(prompts)
        sync()
        calls.append((len(out), sum(g.prompt_tokens for g in out), max(g.new_tokens for g in out),
                      time.perf_counter() - t))
        return out

    t0 = time.perf_counter()
    Evaluator(bench(list(chosen), batch, new_tokens)).score_with(timed, "test", chosen)
    wall = time.perf_counter() - t0
    gen = sum(c[3] for c in calls)
    return {"wall_s": wall, "generate_s": gen, "calls": len(calls), "rows": sum(c[0] for c in calls),
            "prompt_tokens": sum(c[1] for c in calls), "steps": sum(c[2] for c in calls)}


def measure(lm: Any, tok: Any, chosen: dict[str, list[str]], batch: int, new_tokens: int) -> dict[str, Any]:
    """Prefill throughput, decode step time and per-item rates at ``batch``."""
    import torch

    try:
        pre = timed_run(lm, tok, chosen, batch, 1)
        full = timed_run(lm, tok, chosen, batch, new_tokens)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"batch": batch, "error": f"out of memory: {str(e).splitlines()[0][:200]}"}
    extra_steps = max(1, full["steps"] - pre["steps"])
    step_s = max(0.0, full["generate_s"] - pre["generate_s"]) / extra_steps
    return {"batch": batch, "items": full["rows"], "items_per_s": full["rows"] / full["wall_s"],
            "prompt_tokens_per_s": pre["prompt_tokens"] / pre["generate_s"], "decode_step_ms": 1e3 * step_s,
            "wall_s": full["wall_s"], "generate_s": full["generate_s"], "prefill_s": pre["generate_s"],
            "calls": full["calls"], "steps_per_call": full["steps"] / full["calls"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def project(rate: dict[str, Any], st_tokens: float, st_items: int, steps: int) -> dict[str, Any]:
    """GPU-hours of one full evaluation at ``rate``'s batch size (see the module doc)."""
    b, tps, step = rate["batch"], rate["prompt_tokens_per_s"], rate["decode_step_ms"] / 1e3
    single = (st_tokens / tps + math.ceil(st_items / b) * steps * step) / 3600
    multi = [(t / tps + math.ceil(c / b) * steps * step) / 3600
             for t, c in zip(NOTES_MULTI["prompt_tokens"], NOTES_MULTI["calls"], strict=True)]
    return {"batch": b, "single_turn_h": single, "multi_turn_h": multi, "full_h": single + sum(multi) / 2}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 8,32,64,128; tiny: 2,4)")
    p.add_argument("--items", type=int, default=None, help="items per single-turn category (default 16; tiny 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on new tokens (default 64; tiny 4)")
    p.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary (default 32000; tiny 1024)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "bfcl_cost"))
    a = p.parse_args(argv)
    import torch

    tiny = a.tiny
    device = a.device or ("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    batches = [int(x) for x in (a.batch_sizes or ("2,4" if tiny else "8,32,64,128")).split(",")]
    per_cat, new_tokens = a.items or (1 if tiny else 16), a.max_new_tokens or (4 if tiny else 64)
    t0 = time.perf_counter()
    tok = tokenizer(a.vocab or (1024 if tiny else 32000), 2 if tiny else 60)
    lm = model("tiny" if tiny else "8b", len(tok), device)
    setup_s = time.perf_counter() - t0
    chosen = items(per_cat)
    means = prompt_tokens(tok, chosen)
    counts = {c: len(load_category(c)[0]) for c in SINGLE}
    st_tokens, st_items = sum(means[c] * counts[c] for c in SINGLE), sum(counts.values())
    rates = []
    for b in batches:
        rates.append(measure(lm, tok, chosen, b, new_tokens))
        print(json.dumps(rates[-1]), flush=True)
    projections = [project(r, st_tokens, st_items, new_tokens) for r in rates if "error" not in r]
    best = min(projections, key=lambda x: x["full_h"])
    return summary(device, tiny, setup_s, new_tokens, per_cat, st_tokens, st_items, rates, projections, best, a.out)


def summary(device: str, tiny: bool, setup_s: float, new_tokens: int, per_cat: int, st_tokens: float,
            st_items: int, rates: list, projections: list, best: dict, out: str) -> dict[str, Any]:
    import torch

    s = {"device": device if device == "cpu" else torch.cuda.get_device_name(0), "shape": "tiny" if tiny else "8b",
         "points": POINTS, "setup_s": round(setup_s, 1), "max_new_tokens": new_tokens,
         "items_per_category": per_cat, "rates": rates, "projections": projections, "best_batch": best["batch"],
         "single_turn": {"measured": True, "items": st_items, "prompt_tokens": round(st_tokens),
                         "prompt_tokens_vs_notes": round(st_tokens / NOTES_SINGLE_PROMPT_TOKENS, 3),
                         "gpu_hours": best["single_turn_h"]},
         "multi_turn": {"measured": False, "source": "bfcl-notes.md token counts (51-65M prompt tokens, 6-8k "
                        "calls) at the measured rates", "gpu_hours": best["multi_turn_h"]},
         "full_eval_gpu_hours": best["full_h"], "grid_gpu_hours": POINTS * best["full_h"],
         "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    os.makedirs(out, exist_ok=True)
    Path(out, "bfcl_cost.json").write_text(json.dumps(s, indent=1))
    print(json.dumps(s))
    return s


if __name__ == "__main__":
    main()
