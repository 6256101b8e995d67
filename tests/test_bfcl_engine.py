"""BFCL v3 on the generation engine: the same prompts, completions and per-item verdicts as HF ``generate``
(today's path) on a tiny fp32 Llama, every category, single- and multi-turn. Needs ``make bfcl``."""

from __future__ import annotations

import os

import pytest

if not os.environ.get("SOCE_REQUIRE_BFCL"):
    pytest.importorskip("bfcl_eval", reason="make bfcl")

from soce.benchmarks.bfcl import CATEGORIES, Evaluator, load_category  # noqa: E402
from soce.benchmarks.bfcl_gen import EngineGenerator, GenSettings, engine_generator, hf_generator  # noqa: E402
from soce.config import BenchmarkConfig  # noqa: E402
from tests.bfcl_oracle import tiny_llama as tiny_bfcl_llama  # noqa: E402

SINGLE = [c for c in CATEGORIES if not c.startswith("multi_turn")]


@pytest.fixture(scope="module")
def tiny_llama():
    """A random 2-layer Llama and a BPE trained on BFCL texts with the Llama-3 special tokens."""
    return tiny_bfcl_llama()


def recorded(generate, log: dict):
    """``generate`` that records each prompt's completion text."""

    def run(prompts):
        out = generate(prompts)
        log.update({p: (g.text, g.prompt_tokens, g.new_tokens) for p, g in zip(prompts, out, strict=True)})
        return out

    run.__dict__.update(getattr(generate, "__dict__", {}))
    return run


def test_engine_matches_hf_generate_on_every_category(tiny_llama):
    model, tokenizer = tiny_llama
    ids = {c: [e["id"] for e in load_category(c)[0][:2]] for c in SINGLE}
    ids["multi_turn_base"] = ["multi_turn_base_38"]  # the shortest multi-turn entry (2 turns)
    ids["multi_turn_miss_func"] = [load_category("multi_turn_miss_func")[0][0]["id"]]
    bench = BenchmarkConfig(
        name="bfcl_v3",
        categories=list(ids),
        backend="bfcl",
        select_split="test",
        report_split="test",
        batch_size=4,
        options={"max_new_tokens": 6},
    )
    settings = GenSettings(max_new_tokens=6)
    hf_log, engine_log = {}, {}
    ev = Evaluator(bench)
    want = ev.score_with(recorded(hf_generator(model, tokenizer, settings), hf_log), "test", ids)
    gen = engine_generator(model, tokenizer, settings)
    assert isinstance(gen, EngineGenerator)
    stream_log: dict = {}
    orig = gen.result

    def result(r):
        g = orig(r)
        stream_log[tuple(r.ids)] = (g.text, g.prompt_tokens, g.new_tokens)  # the streamed path's completions
        return g

    gen.result = result
    got = ev.score_with(gen, "test", ids)
    assert got["samples"] == want["samples"] and got["item_ids"] == want["item_ids"]
    hf_by_ids = {tuple(tokenizer(p, add_special_tokens=False)["input_ids"]): v for p, v in hf_log.items()}
    assert stream_log == hf_by_ids  # every prompt, the same completion and token counts
    assert gen.engine.stats.reused_tokens > 0, "multi-turn steps reuse their conversation's KV"
    assert len(gen.engine.pool.free) == gen.engine.pool.pages - 1, "sessions are freed after the evaluation"
    direct = recorded(gen, engine_log)  # the same generator called in rounds (no streaming)
    ev.score_with(direct, "test", {c: ids[c] for c in ("simple", "live_multiple")})
    assert all(hf_log[p] == v for p, v in engine_log.items())


def test_score_uses_one_engine_per_model(tiny_llama):
    model, tokenizer = tiny_llama
    bench = BenchmarkConfig(
        name="bfcl_v3",
        categories=["simple"],
        backend="bfcl",
        select_split="test",
        report_split="test",
        batch_size=2,
        options={"max_new_tokens": 3},
    )
    ev = Evaluator(bench)
    ids = {"simple": ["simple_0", "simple_1"]}
    first = ev.score(model, tokenizer, "test", ids)
    engine = ev._engines[id(model)]
    assert ev.score(model, tokenizer, "test", ids)["samples"] == first["samples"]
    assert ev._engines[id(model)] is engine
    hf = Evaluator(BenchmarkConfig(**{**bench.__dict__, "options": {"max_new_tokens": 3, "engine": "hf"}}))
    assert hf.score(model, tokenizer, "test", ids)["samples"] == first["samples"] and not hf._engines
