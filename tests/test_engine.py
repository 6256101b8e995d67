"""The generation engine (soce.benchmarks.generation) on the CPU: HF ``generate``'s greedy tokens, whatever the
batching (rows, pages, chunks, preemption), session KV reuse and forced decoding."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from soce.benchmarks.generation import Engine, EngineConfig, Request, kv_bytes_per_token, supported

EOS = 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(5, 300, (n,), generator=g).tolist() for n in (3, 40, 17, 100, 64, 9, 33, 200)]


def hf(model, prompt: list[int], new: int) -> list[int]:
    """HF generate, one prompt at a time (no padding): today's greedy reference."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def reference(model, prompts):
    return [hf(model, p, 20) for p in prompts]


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(),  # CPU defaults: 16 rows, pages of 16, chunks of 512
        EngineConfig(slots=3, page=4, chunk=37),  # rows wait for a slot, prompts split over chunks
        EngineConfig(slots=8, page=8, kv_bytes=8 * 45 * 512),  # 45 pages: rows are preempted and re-prefilled
    ],
    ids=["defaults", "small-rows-chunks", "preempting"],
)
def test_engine_gives_hf_greedy_tokens(model, prompts, reference, config):
    engine = Engine(model, config)
    reqs = engine.generate([Request(p, 20, frozenset({EOS})) for p in prompts])
    assert [r.out for r in reqs] == reference
    assert all(r.done for r in reqs) and not engine.busy()
    assert engine.stats.prefill_tokens >= sum(map(len, prompts))
    if config.kv_bytes:
        assert engine.stats.preempted > 0
    assert len(engine.pool.free) == engine.pool.pages - 1, "every page is back"


def test_session_reuses_the_common_prefix(model, prompts):
    engine = Engine(model, EngineConfig(slots=4, page=8))
    first = engine.generate([Request(prompts[3], 20, frozenset({EOS}), session="a")])[0]
    follow = prompts[3] + first.out + [7, 8, 9, 10]  # the conversation goes on
    second = engine.generate([Request(follow, 20, frozenset({EOS}), session="a")])[0]
    assert second.reused == len(prompts[3]) + len(first.out) - 1  # the last sampled token had no KV yet
    assert second.out == hf(model, follow, 20)
    other = engine.generate([Request(prompts[1], 20, frozenset({EOS}), session="a")])[0]  # no common prefix
    assert other.reused == 0 and other.out == hf(model, prompts[1], 20)
    engine.end_session("a")
    assert len(engine.pool.free) == engine.pool.pages - 1


def test_forced_tokens_are_fed_and_the_argmax_recorded(model, prompts, reference):
    engine = Engine(model, EngineConfig())
    r = engine.generate([Request(prompts[0], 50, frozenset({EOS}), force=[11, 12, 13, EOS])])[0]
    assert r.out == [11, 12, 13, EOS] and len(r.argmax) == 4
    assert r.argmax[0] == reference[0][0]
    assert engine.stats.decode_steps == 3  # one step per forced token after the first


def test_stop_strings_end_a_row():
    class Tok:
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    engine = Engine(model, EngineConfig(), tokenizer=Tok())
    free = engine.generate([Request([1, 2, 3], 12, frozenset())])[0]
    text = Tok().decode(free.out)
    stop = text[4:6]
    cut = engine.generate([Request([1, 2, 3], 12, frozenset(), stop_strings=(stop,))])[0]
    assert cut.out == free.out[: len(cut.out)] and stop in Tok().decode(cut.out)
    assert stop not in Tok().decode(cut.out[:-1])


def test_supported_and_sizes(model):
    assert supported(model) and not supported(torch.nn.Linear(2, 2))
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 16 * 4
    with pytest.raises(ValueError, match="needs .* KV pages"):
        Engine(model, EngineConfig(page=8, kv_bytes=8 * 10 * 512)).add(Request(list(range(5, 100)), 20))
