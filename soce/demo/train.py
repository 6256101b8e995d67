"""Tiny character-level Llama models for the demo: tokenizer, model, training loop, fast scoring, souping.

Everything here is CPU-friendly and deterministic for a fixed seed and thread count.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from soce.demo.tasks import ALPHABET, Item

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
VOCAB: dict[str, int] = {PAD: 0, EOS: 1, UNK: 2, **{c: i + 3 for i, c in enumerate(ALPHABET)}}
PAD_ID, EOS_ID = VOCAB[PAD], VOCAB[EOS]


def encode(text: str) -> list[int]:
    """Character ids, exactly as the saved tokenizer encodes ``text`` (no special tokens added)."""
    return [VOCAB[c] for c in text]


def make_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """A character-level WordLevel tokenizer over :data:`VOCAB`; no BOS, ``<eos>`` ends a target."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=max_length
    )


@dataclass(frozen=True)
class ModelShape:
    """Llama hyper-parameters of the demo models (sizes in units of hidden features / tokens)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    mlp: int = 512
    max_len: int = 64


def make_model(shape: ModelShape, seed: int) -> LlamaForCausalLM:
    """A freshly initialised float32 Llama with untied embeddings (so every tensor is in the file)."""
    cfg = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_len,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
        rope_theta=10000.0,
        initializer_range=0.05,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def set_threads(n: int | None = None) -> int:
    """Use ``n`` torch threads (None: ``OMP_NUM_THREADS`` when set, else every core this process may run
    on); returns the thread count."""
    if n is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n = int(os.environ["OMP_NUM_THREADS"])
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def _batch(items: Sequence[Item], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 except on target characters and ``<eos>``).

    With right padding a causal model never lets a real token see a pad, so training and scoring pass
    no attention mask (faster); the mask is returned for callers that want it."""
    seqs = [(encode(p), encode(t) + [EOS_ID]) for p, t in items]
    width = max(len(p) + len(t) for p, t in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, t) in enumerate(seqs):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)
    return ids.to(device), (ids != PAD_ID).long().to(device), labels.to(device)


@dataclass(frozen=True)
class TrainSpec:
    """One training run: ``steps`` optimizer steps of ``batch`` items drawn from ``mixture``
    (category -> relative weight), peak learning rate ``lr`` with linear warm-up over ``warmup`` steps,
    then cosine decay to ``lr * final_lr_frac``. ``save_at``: steps after which ``on_save`` is called."""

    steps: int
    batch: int
    lr: float
    mixture: Mapping[str, float]
    warmup: int = 20
    final_lr_frac: float = 0.1
    save_at: tuple[int, ...] = ()
    seed: int = 0


def mixture_stream(
    samplers: Mapping[str, Callable[[], Item]], mixture: Mapping[str, float], seed: int
) -> Iterator[Item]:
    """Endless items; each one's category is drawn with probability proportional to ``mixture``."""
    rng = random.Random(seed)
    names = [c for c, w in mixture.items() if w > 0]
    weights = [mixture[c] for c in names]
    while True:
        yield samplers[rng.choices(names, weights)[0]]()


def train(
    model: LlamaForCausalLM,
    spec: TrainSpec,
    samplers: Mapping[str, Callable[[], Item]],
    on_save: Callable[[int, LlamaForCausalLM], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> LlamaForCausalLM:
    """Train ``model`` in place (AdamW, loss on target characters only) and return it."""
    device = next(model.parameters()).device
    torch.manual_seed(spec.seed)
    stream = mixture_stream(samplers, spec.mixture, spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.final_lr_frac + (1 - spec.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    for step in range(1, spec.steps + 1):
        ids, _, labels = _batch([next(stream) for _ in range(spec.batch)], device)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, loss.detach().item())
        if on_save is not None and step in spec.save_at:
            model.eval()
            on_save(step, model)
            model.train()
    model.eval()
    return model


@torch.no_grad()
def exact_match(model: LlamaForCausalLM, items: Sequence[Item], batch: int = 256) -> list[bool]:
    """Per item: is ``target`` the greedy continuation of ``prompt``? (lm-eval's ``acc`` for a
    loglikelihood request with an empty target delimiter, computed in one batched forward pass.)"""
    device = next(model.parameters()).device
    model.eval()
    out: list[bool] = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        ids, _, labels = _batch(chunk, device)
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        gold = labels[:, 1:].clone()
        gold[gold == EOS_ID] = -100  # lm-eval scores the target characters only, not <eos>
        ok = (pred == gold) | (gold == -100)
        out.extend(ok.all(dim=1).tolist())
    return out


def quick_scores(
    model: LlamaForCausalLM | str | Path, items: Mapping[str, Sequence[Item]], batch: int = 256
) -> dict[str, float]:
    """Exact-match accuracy in [0, 1] per category of ``items`` (category -> items); ``model`` may be
    a checkpoint folder."""
    if not isinstance(model, LlamaForCausalLM):
        model = LlamaForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    return {c: sum(ok) / max(1, len(ok)) for c, ok in ((c, exact_match(model, v, batch)) for c, v in items.items())}


def average_state(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted soup ``sum_j w_j * W_j`` per tensor (float32); weights are used as given."""
    return {k: sum(w * s[k].float() for s, w in zip(states, weights, strict=True)) for k in states[0]}
