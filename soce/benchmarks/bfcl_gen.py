"""Generation behind bfcl-eval's own inference loops: a live HF model instead of a vLLM server.

bfcl-eval's local handlers reach their server only through ``_query_prompting`` and
``_parse_query_response_prompting``; :func:`live_handler` overrides those two on the pool's handler class
(``LlamaHandler`` or ``SalesforceLlamaHandler``, as bfcl-eval 2025.6.15 has them), so the package's
single- and multi-turn loops (prompt formatting, decoding, executing the multi-turn APIs, follow-up turns)
run unchanged. :func:`run_entries` runs those loops in ``workers`` threads whose queries meet in a
:class:`Batcher`: a batch is generated when every busy thread is waiting, so each batch holds one query per
thread; the sets of queries in each batch do not depend on thread timing (each thread issues exactly one
query per round), which keeps padding, hence greedy outputs, reproducible.

With the generation engine (:class:`EngineGenerator`, :mod:`soce.benchmarks.generation`) there are no rounds: a
:class:`Streamer` hands each query to the engine as soon as its thread asks, the calling thread drives the
engine, and a query returns as soon as its own completion is done (continuous batching across entries and steps).
A multi-turn entry is one engine session: its KV cache is kept between its steps, and only the new tokens (tool
results, the next user turn) are prefilled. The engine's rows compute independently of each other (fixed shapes
on the GPU), so thread timing changes no token beyond rounding.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from soce.benchmarks import bfcl_sdk


@dataclass(frozen=True)
class Generation:
    """One completion: its text (special tokens removed) and token counts."""

    text: str
    prompt_tokens: int = 0
    new_tokens: int = 0


Generate = Callable[[list[str]], list[Generation]]  # formatted prompts -> completions, same order


@dataclass(frozen=True)
class GenSettings:
    """Greedy generation settings (``benchmark.options``); tokens are the tokenizer's."""

    max_new_tokens: int = 1024
    stop_tokens: tuple[str, ...] = ("<|eot_id|>", "<|eom_id|>")
    max_batch_tokens: int = 262144  # most (prompt + new) tokens x rows in one generate call (splits a batch)
    engine: str = "auto"  # auto: soce.benchmarks.generation where it runs the model, else HF generate; hf: HF generate


def stop_ids(tokenizer: Any, stop_tokens: Sequence[str]) -> list[int]:
    """Token ids that end a completion: the stop tokens the vocabulary has, and the tokenizer's eos."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in stop_tokens if t in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"the tokenizer has none of the stop tokens {list(stop_tokens)} and no eos token")
    return ids


def hf_generator(model: Any, tokenizer: Any, settings: GenSettings) -> Generate:
    """Greedy batched generation with ``model`` (left padding, stop on the stop ids); prompts already hold
    their special tokens (the handlers write ``<|begin_of_text|>``), so none are added."""
    import torch
    from transformers import GenerationConfig

    stops = stop_ids(tokenizer, settings.stop_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad
    )
    device = next(model.parameters()).device

    def run(prompts: list[str]) -> list[Generation]:
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt").to(
            device
        )
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=config)
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        lens = enc["attention_mask"].sum(dim=1).tolist()
        gens = []
        for row, n in zip(new, lens, strict=True):
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            gens.append(Generation(tokenizer.decode(row[:end], skip_special_tokens=True), int(n), end))
        return gens

    def generate(prompts: list[str]) -> list[Generation]:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = pad
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        chunks: list[list[int]] = [[]]
        for i in sorted(range(len(prompts)), key=lambda i: lengths[i]):  # similar lengths share a chunk
            padded = lengths[i] + settings.max_new_tokens
            if chunks[-1] and (len(chunks[-1]) + 1) * padded > settings.max_batch_tokens:
                chunks.append([])
            chunks[-1].append(i)
        out: dict[int, Generation] = {}
        for chunk in chunks:
            out.update(zip(chunk, run([prompts[i] for i in chunk]), strict=True))
        return [out[i] for i in range(len(prompts))]

    return generate


@dataclass
class EngineGenerator:
    """A :data:`Generate` backed by the generation engine (one engine run per call), which :func:`run_entries`
    streams instead (:class:`Streamer`). ``force`` (benchmarks only): prompt -> the tokens to feed instead of
    the argmax (see :class:`soce.benchmarks.generation.Request`)."""

    engine: Any
    tokenizer: Any
    settings: GenSettings
    force: Callable[[str], list[int] | None] | None = None
    workers: int | None = None  # threads (live entries) when streamed; None: the engine's rows

    def __post_init__(self) -> None:
        self.stops = frozenset(stop_ids(self.tokenizer, self.settings.stop_tokens))
        self.lock = threading.Lock()  # a fast tokenizer used from two threads at once can fail ("Already borrowed")

    def request(self, prompt: str, session: str | None = None) -> Any:
        from soce.benchmarks.generation import Request

        with self.lock:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            force = self.force(prompt) if self.force is not None else None
        return Request(ids, self.settings.max_new_tokens, self.stops, session=session, force=force)

    def result(self, req: Any) -> Generation:
        """The completion as :func:`hf_generator` reports it (text up to the first stop token)."""
        end = next((i + 1 for i, t in enumerate(req.out) if t in self.stops), len(req.out))
        with self.lock:
            text = self.tokenizer.decode(req.out[:end], skip_special_tokens=True)
        return Generation(text, len(req.ids), end)

    def __call__(self, prompts: list[str]) -> list[Generation]:
        reqs = self.engine.generate([self.request(p) for p in prompts])
        return [self.result(r) for r in reqs]


def engine_generator(model: Any, tokenizer: Any, settings: GenSettings, engine: Any = None) -> Generate:
    """The engine's generator where the engine runs ``model`` (``settings.engine``), else :func:`hf_generator`."""
    from soce.benchmarks import generation

    if settings.engine == "hf" or not generation.supported(model):
        return hf_generator(model, tokenizer, settings)
    return EngineGenerator(engine or generation.Engine(model, tokenizer=tokenizer), tokenizer, settings)


class Aborted(Exception):
    """Raised in the workers that wait on a round when another worker (or the round's generation) failed."""


class Batcher:
    """Gathers the queries of ``workers`` threads into one ``generate`` call per round (see module doc).

    A failure (of ``generate``, or of a worker, see :meth:`leave`) is raised once, in the thread where it
    happened; every other waiting or later query raises :class:`Aborted`."""

    def __init__(self, generate: Generate, workers: int) -> None:
        self._generate, self._active = generate, workers
        self._cv = threading.Condition()
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._failed = False

    def submit(self, prompt: str) -> Generation:
        """The completion of ``prompt``; blocks until its round is generated."""
        slot: dict[str, Any] = {}
        with self._cv:
            if self._failed:
                raise Aborted()
            self._pending.append((prompt, slot))
            self._maybe_run()
            while "out" not in slot and not self._failed:
                self._cv.wait()
            if "out" not in slot:
                raise Aborted()
            return slot["out"]

    def leave(self, failed: bool = False) -> None:
        """A worker is done (``failed``: with an error, so every waiting query is aborted)."""
        with self._cv:
            self._active -= 1
            if failed:
                self._failed = True
                self._cv.notify_all()
            self._maybe_run()

    def _maybe_run(self) -> None:
        if not self._pending or len(self._pending) < self._active or self._failed:
            return
        batch, self._pending = self._pending, []
        try:
            outs = self._generate([p for p, _ in batch])
            if len(outs) != len(batch):
                raise RuntimeError(f"generate returned {len(outs)} completions for {len(batch)} prompts")
        except BaseException:
            self._failed = True
            self._cv.notify_all()
            raise
        for (_, slot), out in zip(batch, outs, strict=True):
            slot["out"] = out
        self._cv.notify_all()


_CURRENT = threading.local()  # the entry a worker thread is running (its engine session)


class Streamer:
    """Continuous batching for :func:`run_entries`' threads (see the module doc): workers :meth:`submit`, the
    calling thread :meth:`serve` s. Failures are reported as :class:`Batcher` reports them."""

    def __init__(self, gen: EngineGenerator, workers: int) -> None:
        self._gen, self._active = gen, workers
        self._cv = threading.Condition()
        self._inbox: list[tuple[Any, dict[str, Any]]] = []
        self._ended: list[str] = []
        self._waiting: dict[int, dict[str, Any]] = {}  # id -> slot of every query not yet answered
        self._failed = False

    def submit(self, prompt: str) -> Generation:
        """The completion of ``prompt`` (blocks); a multi-turn entry's queries share its engine session."""
        req = self._gen.request(prompt, getattr(_CURRENT, "session", None))
        slot: dict[str, Any] = {"ready": threading.Event()}
        with self._cv:
            if self._failed:
                raise Aborted()
            self._inbox.append((req, slot))
            self._waiting[id(slot)] = slot
            self._cv.notify_all()
        slot["ready"].wait()  # one wake-up per query, not one per finished query
        if "out" not in slot:
            raise Aborted()
        return slot["out"]

    def end_session(self, session: str) -> None:
        with self._cv:
            self._ended.append(session)
            self._cv.notify_all()

    def leave(self, failed: bool = False) -> None:
        with self._cv:
            self._active -= 1
            if failed:
                self._fail()
            self._cv.notify_all()

    def _fail(self) -> None:
        """Under the lock: every waiting query is aborted."""
        self._failed = True
        for slot in self._waiting.values():
            slot["ready"].set()

    def serve(self) -> None:
        """Drive the engine until every worker has left (or one failed); engine errors are raised here."""
        import torch

        engine, slots = self._gen.engine, {}
        try:
            with torch.no_grad():
                while (todo := self._take(engine)) is not None:
                    new, ended = todo
                    for session in ended:
                        engine.end_session(session)
                    for req, slot in new:
                        engine.add(req)
                        slots[id(req)] = slot
                    done = engine.step() if engine.busy() else []
                    for r in done:
                        slot = slots.pop(id(r))
                        slot["out"] = self._gen.result(r)
                        with self._cv:
                            self._waiting.pop(id(slot))
                        slot["ready"].set()
        except BaseException:
            with self._cv:
                self._fail()
                self._cv.notify_all()
            raise
        finally:
            engine.clear()

    def _take(self, engine: Any) -> tuple[list, list[str]] | None:
        """New queries and ended sessions (waits while there is nothing to do); None when all is done."""
        with self._cv:
            while not (self._inbox or self._ended or engine.busy() or self._active <= 0 or self._failed):
                self._cv.wait()
            if self._failed or (self._active <= 0 and not self._inbox and not engine.busy()):
                return None
            new, self._inbox, ended, self._ended = self._inbox, [], self._ended, []
            return new, ended


_LIVE: dict[type, type] = {}
_LIVE_LOCK = threading.Lock()
_Base: type = object  # the handler class being subclassed (``@override`` resolves base names in module globals)


def live_handler(kind: type, model_name: str, batcher: Batcher | Streamer) -> Any:
    """An instance of bfcl-eval handler class ``kind`` whose queries go to ``batcher`` instead of a server."""
    global _Base
    from overrides import override

    with _LIVE_LOCK:
        if kind not in _LIVE:
            _Base = kind

            class LiveHandler(_Base):  # type: ignore[misc, valid-type]
                _soce_batcher: Batcher | Streamer

                @override
                def _query_prompting(self, inference_data: dict):  # noqa: ANN202 - bfcl-eval's signature
                    prompt = self._format_prompt(inference_data["message"], inference_data["function"])
                    inference_data["inference_input_log"] = {"formatted_prompt": prompt}
                    start = time.time()
                    return self._soce_batcher.submit(prompt), time.time() - start

                @override
                def _parse_query_response_prompting(self, api_response: any) -> dict:
                    return {
                        "model_responses": api_response.text,
                        "input_token": api_response.prompt_tokens,
                        "output_token": api_response.new_tokens,
                    }

            LiveHandler.__name__ = LiveHandler.__qualname__ = f"Live{kind.__name__}"
            _LIVE[kind] = LiveHandler
    handler = _LIVE[kind](model_name, 0.0)
    handler._soce_batcher = batcher
    return handler


def run_entries(kind: type, model_name: str, entries: list[dict], generate: Generate, workers: int) -> dict[str, Any]:
    """Each entry's raw model result (bfcl-eval's ``result``: a string for single-turn entries, a list of
    turns of step strings for multi-turn ones), by entry id; entries are consumed (mutated). The package's
    progress lines go to a discarded buffer; the first error of any worker is raised. An
    :class:`EngineGenerator` is streamed (``generate.workers`` threads, default the engine's rows), anything
    else batched in rounds of ``workers`` queries."""
    bfcl = bfcl_sdk.load()
    streamed = isinstance(generate, EngineGenerator)
    workers = max(1, min(generate.workers or generate.engine.slots if streamed else workers, len(entries)))
    batcher = Streamer(generate, workers) if streamed else Batcher(generate, workers)
    handler = live_handler(kind, model_name, batcher)
    todo, lock, results, errors = iter(entries), threading.Lock(), {}, []

    def work() -> None:
        failed = False
        try:
            while not errors:
                with lock:
                    entry = next(todo, None)
                if entry is None:
                    break
                _CURRENT.session = f"{model_name}/{entry['id']}"
                if bfcl.utils.is_multi_turn(entry["id"]):
                    result, _ = handler.inference_multi_turn_prompting(entry, False, True)
                else:
                    result, _ = handler.inference_single_turn_prompting(entry, False)
                results[entry["id"]] = result
                if streamed:
                    batcher.end_session(_CURRENT.session)
        except Aborted:
            failed = True
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            failed = True
            errors.append(e)
        finally:
            batcher.leave(failed)

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        try:
            if streamed:
                batcher.serve()
        finally:
            for t in threads:
                t.join()
    if errors:
        raise errors[0]
    return results
