"""One greedy generation engine for evaluation: a paged KV cache, continuous batching, CUDA-graph decode.

gpt-fast style, in plain PyTorch over a live transformers Llama-family model (its modules and weights are used
in place: a ``Remixer`` re-mix between evaluations is seen at once, with no reload and no copy):

* **KV cache**: one pool of pages (``page`` tokens each) per layer, ``[1, kv_heads, pages * page, head_dim]``,
  sized from free GPU memory (:func:`plan_pages`); page 0 is scratch (padding rows write and read it). A sequence
  owns a list of pages; the attention mask is the rule of :func:`_visible` (the page's owner is the query's
  sequence, and the key's position is not after the query's), so one rule serves prefill and decode.
* **Scheduling** (:class:`Engine`): requests wait in arrival order; a sequence is admitted to one of ``slots``
  rows when its prompt's pages are free; prompts are prefilled in packed chunks of up to ``chunk`` tokens (a long
  prompt spans chunks); every admitted row decodes one token per step; a row leaves at a stop token, a stop
  string or ``max_new`` tokens, and a waiting request takes its row (continuous batching). When pages run out,
  idle session caches go first, then the latest admitted row is preempted (its pages freed, its tokens
  re-prefilled later: the output is unchanged up to rounding).
* **Sessions**: a request with ``session`` set keeps its KV when it finishes; the next request of that session
  prefills only what follows the longest common token prefix (multi-turn: the new tool results and turns).
* **Attention**: FlexAttention on CUDA (decode under ``torch.compile(mode="reduce-overhead")``, i.e. one CUDA
  graph per step; prefill eager with a compiled flex kernel); on the CPU the same passes run eagerly with SDPA
  over the gathered pages (same mask rule), which gives today's greedy tokens on small fp32 models.

Units: tokens are token ids; ``page``/``chunk``/``slots`` count tokens/tokens/rows; memory in bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

GIB = 2**30


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs; ``None`` fields take the device's default (CUDA / CPU)."""

    slots: int | None = None  # rows decoding at once (the CUDA graph's batch): 256 / 16
    page: int | None = None  # tokens per KV page (FlexAttention's block on CUDA): 128 / 16
    chunk: int | None = None  # most prompt tokens per prefill pass: 8192 / 512
    prefill_sizes: tuple[int, ...] | None = None  # CUDA: chunk lengths a pass is padded to (each compiles once)
    kv_bytes: int | None = None  # KV pool size; None: free device memory - reserve (CPU: 256 MiB)
    reserve_bytes: int = 6 * GIB  # left free on the device for activations, logits, graphs
    compile: bool | None = None  # CUDA graphs + compiled flex attention; None: on CUDA
    attention: str | None = None  # "flex" | "dense" (SDPA over gathered pages); None: flex on CUDA, dense on CPU


@dataclass
class Request:
    """One greedy completion. ``force`` (benchmarks): tokens fed instead of the argmax, one decode step each,
    so lengths are those of a model that answers ``force``; the argmax is still recorded in ``argmax``."""

    ids: list[int]
    max_new: int
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    session: str | None = None
    force: list[int] | None = None
    out: list[int] = field(default_factory=list)  # new tokens (the stop token included)
    argmax: list[int] = field(default_factory=list)
    reused: int = 0  # prompt tokens whose KV came from the session's cache
    done: bool = False


@dataclass
class Stats:
    """What the engine did (seconds of synchronised wall time; tokens)."""

    prefill_passes: int = 0
    prefill_tokens: int = 0  # real prompt tokens run through the model
    prefill_padded: int = 0  # tokens of the passes, padding included
    prefill_s: float = 0.0
    prefill_attn: int = 0  # keys attended by the prefilled tokens, summed (their positions + 1)
    reused_tokens: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0  # live rows summed over steps
    decode_kv_tokens: int = 0  # live KV tokens read, summed over steps
    decode_s: float = 0.0
    preempted: int = 0
    evicted: int = 0

    def add(self, other: Stats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class _Seq:
    req: Request
    sid: int
    pages: list[int] = field(default_factory=list)
    kv_len: int = 0  # tokens of stream() whose KV is in the pages
    target: int = 0  # kv_len at which the prefill is complete
    slot: int = -1

    def stream(self) -> list[int]:
        return self.req.ids + self.req.out


def supported(model: Any) -> bool:
    """Whether the engine can run ``model``: a decoder of the Llama family (rotary, q/k/v/o projections)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return False
    attn = getattr(layers[0], "self_attn", None)
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def kv_bytes_per_token(model: Any) -> int:
    """KV cache bytes one token takes (all layers, K and V)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dtype = next(model.parameters()).dtype
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * dtype.itemsize


def plan_pages(model: Any, page: int, kv_bytes: int | None, reserve: int) -> int:
    """Pages of the KV pool: ``kv_bytes``, or on CUDA the free memory less ``reserve`` (CPU: 256 MiB)."""
    device = next(model.parameters()).device
    if kv_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            kv_bytes = free - reserve
        else:
            kv_bytes = 256 * 2**20
    pages = int(kv_bytes // (page * kv_bytes_per_token(model)))
    if pages < 4:
        raise MemoryError(f"{kv_bytes / GIB:.2f} GiB leave no room for a KV cache ({pages} pages)")
    return pages


def _visible(owner: torch.Tensor, start: torch.Tensor, page: int, seq: Any, pos: Any, kv: Any) -> Any:
    """The mask rule: key ``kv`` (a pool index) is visible to a query of sequence ``seq`` at position ``pos``."""
    p = kv // page
    return (owner[p] == seq) & (start[p] + kv % page <= pos)


class _Pool:
    """The paged KV pool and its page table (owner sequence and first position of each page)."""

    def __init__(self, model: Any, pages: int, page: int) -> None:
        c, param = model.config, next(model.parameters())
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        shape = (1, c.num_key_value_heads, pages * page, head_dim)
        kw = {"device": param.device, "dtype": param.dtype}
        self.k = [torch.zeros(shape, **kw) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, **kw) for _ in range(c.num_hidden_layers)]
        self.owner = torch.full((pages,), -1, dtype=torch.int32, device=param.device)
        self.start = torch.zeros(pages, dtype=torch.int32, device=param.device)
        self.page, self.pages = page, pages
        self.free = list(range(pages - 1, 0, -1))  # page 0: scratch
        self._pending: dict[int, tuple[int, int]] = {}

    def take(self, sid: int, first: int) -> int:
        """A free page for sequence ``sid`` holding positions from ``first``."""
        p = self.free.pop()
        self._pending[p] = (sid, first)
        return p

    def own(self, page: int, sid: int, first: int) -> None:
        self._pending[page] = (sid, first)

    def give(self, pages: Iterable[int]) -> None:
        self.free.extend(pages)

    def flush(self) -> None:
        """Write the page-table changes to the device (once per pass)."""
        if not self._pending:
            return
        idx = torch.tensor(list(self._pending), dtype=torch.long)
        vals = torch.tensor(list(self._pending.values()), dtype=torch.int32)
        self.owner[idx.to(self.owner.device)] = vals[:, 0].to(self.owner.device)
        self.start[idx.to(self.owner.device)] = vals[:, 1].to(self.owner.device)
        self._pending.clear()


def _layers_forward(
    model: Any,
    pool: _Pool,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    write: torch.Tensor,
    attend: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Final hidden states ``[B, T, hidden]`` of ``tokens`` ``[B, T]`` at positions ``pos``; each token's K/V is
    written to pool index ``write`` ``[B*T]`` first, then ``attend(q, k_pool, v_pool)`` reads the pool."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    h = inner.embed_tokens(tokens)
    cos, sin = inner.rotary_emb(h, pos)
    b, t = tokens.shape
    for i, layer in enumerate(inner.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = a.q_proj(x).view(b, t, -1, pool.k[i].shape[-1])
        k = a.k_proj(x).view(b, t, -1, pool.k[i].shape[-1])
        v = a.v_proj(x).view(b, t, -1, pool.k[i].shape[-1])
        if hasattr(a, "q_norm"):  # Qwen3-style per-head norms
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        pool.k[i].index_copy_(2, write, k.transpose(0, 1).reshape(1, k.shape[1], b * t, -1))
        pool.v[i].index_copy_(2, write, v.permute(2, 0, 1, 3).reshape(1, v.shape[2], b * t, -1))
        o = attend(q, pool.k[i], pool.v[i])
        h = h + a.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return inner.norm(h)


@dataclass
class _Pass:
    """One forward pass's inputs, built on the host: rows x tokens, and the pages each row's query blocks read."""

    tokens: list[list[int]]
    pos: list[list[int]]
    seq: list[list[int]]  # sequence id per token (-1: padding)
    write: list[list[int]]  # pool index per token
    blocks: list[list[list[int]]]  # [row][query block] -> pages to read


def _dense_attend(pool: _Pool, p: _Pass, q_seq: torch.Tensor, q_pos: torch.Tensor) -> Callable[..., torch.Tensor]:
    """CPU attention: SDPA over each row's gathered pages, masked by :func:`_visible`."""
    rows = [sorted({pg for blk in r for pg in blk}) for r in p.blocks]
    width = max(len(r) for r in rows)
    pages = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)  # [B, W]
    kv = (pages[:, :, None] * pool.page + torch.arange(pool.page)).reshape(len(rows), -1)  # [B, S]
    mask = _visible(pool.owner, pool.start, pool.page, q_seq[:, :, None], q_pos[:, :, None], kv[:, None, :])
    mask = mask[:, None]  # [B, 1, T, S]

    def attend(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        rep = q.shape[1] // k_pool.shape[1]
        k = k_pool[0][:, kv].transpose(0, 1).repeat_interleave(rep, dim=1)  # [B, Hq, S, D]
        v = v_pool[0][:, kv].transpose(0, 1).repeat_interleave(rep, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return attend


def _block_tensors(blocks: list[list[list[int]]], width: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's ``kv_num_blocks [B, 1, QB]`` and ``kv_indices [B, 1, QB, width]`` from page lists."""
    num = torch.tensor([[len(b) for b in row] for row in blocks], dtype=torch.int32)
    idx = torch.zeros(len(blocks), len(blocks[0]), width, dtype=torch.int32)
    for r, row in enumerate(blocks):
        for j, b in enumerate(row):
            idx[r, j, : len(b)] = torch.tensor(b, dtype=torch.int32)
    return num[:, None].to(device), idx[:, None].to(device)


def _flex_mask(pool: _Pool, q_seq: torch.Tensor, q_pos: torch.Tensor) -> Callable[..., Any]:
    """FlexAttention ``mask_mod`` of :func:`_visible` over the (persistent) per-token buffers ``[B, T]``."""
    owner, start, page = pool.owner, pool.start, pool.page

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return _visible(owner, start, page, q_seq[b, q_idx], q_pos[b, q_idx], kv_idx)

    return mask_mod


def _block_mask(num: torch.Tensor, idx: torch.Tensor, mask_mod: Any, q_block: int, page: int, lengths: tuple) -> Any:
    from torch.nn.attention.flex_attention import BlockMask

    try:
        return BlockMask.from_kv_blocks(
            num, idx, BLOCK_SIZE=(q_block, page), mask_mod=mask_mod, seq_lengths=lengths, compute_q_blocks=False
        )
    except TypeError:  # older torch: no compute_q_blocks
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(q_block, page), mask_mod=mask_mod, seq_lengths=lengths)


class _Decoder:
    """The decode step on CUDA: persistent buffers, the whole step (embedding to argmax) compiled with CUDA graphs."""

    def __init__(self, model: Any, pool: _Pool, slots: int, compile: bool) -> None:
        device = pool.owner.device
        self.io = torch.zeros(4, slots, dtype=torch.long, device=device)  # token, position, write index, seq id
        self.num = torch.ones(slots, 1, 1, dtype=torch.int32, device=device)
        self.idx = torch.zeros(slots, 1, 1, pool.pages, dtype=torch.int32, device=device)
        self.pool, self.model = pool, model
        self.seen: dict[int, tuple[int, int]] = {}  # slot -> (sequence id, pages written to idx)
        for t in (self.io, self.num, self.idx, pool.owner, pool.start, *pool.k, *pool.v):
            torch._dynamo.mark_static_address(t)
        self.step = torch.compile(self._step, mode="reduce-overhead", fullgraph=True) if compile else self._step

    def _step(self) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        pool, io = self.pool, self.io
        q_seq, q_pos = io[3][:, None], io[1][:, None]
        mask = _block_mask(
            self.num, self.idx, _flex_mask(pool, q_seq, q_pos), 128, pool.page, (1, pool.pages * pool.page)
        )

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=True)

        h = _layers_forward(self.model, pool, io[0][:, None], io[1][:, None], io[2], attend)
        return self.model.lm_head(h[:, 0]).argmax(-1)


class Engine:
    """Greedy generation over a live model (see the module doc). Not thread-safe: one thread drives it."""

    def __init__(self, model: Any, config: EngineConfig = EngineConfig(), tokenizer: Any = None) -> None:
        if not supported(model):
            raise ValueError(f"{type(model).__name__}: the generation engine runs Llama-family decoders only")
        param = next(model.parameters())
        cuda = param.device.type == "cuda"
        self.model, self.tokenizer, self.cuda = model, tokenizer, cuda
        self.slots = config.slots or (256 if cuda else 16)
        self.page = config.page or (128 if cuda else 16)
        self.chunk = config.chunk or (8192 if cuda else 512)
        self.sizes = tuple(sorted(config.prefill_sizes or ((1024, self.chunk) if cuda else ())))
        self.compile = cuda if config.compile is None else config.compile
        self.flex = (config.attention or ("flex" if cuda else "dense")) == "flex"
        self.pool = _Pool(model, plan_pages(model, self.page, config.kv_bytes, config.reserve_bytes), self.page)
        self.stats = Stats()
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.rows: list[_Seq | None] = [None] * self.slots
        self.cache: collections.OrderedDict[str, _Seq] = collections.OrderedDict()  # idle sessions, LRU first
        self._sids = iter(range(1, 2**31 - 1))
        self._order: list[int] = []  # admission order of live sequence ids (for preemption)
        self._decoder = _Decoder(model, self.pool, self.slots, self.compile) if self.flex else None
        self._prefill_masks: dict[int, tuple[torch.Tensor, torch.Tensor, Any]] = {}
        self._flex = None

    # -- public ------------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue ``req`` (its prompt must be non-empty and fit the KV pool with its new tokens)."""
        if not req.ids:
            raise ValueError("empty prompt")
        need = math.ceil((len(req.ids) + req.max_new) / self.page)
        if need > self.pool.pages - 1:
            raise ValueError(
                f"a prompt of {len(req.ids)} tokens + {req.max_new} new needs {need} KV pages; "
                f"the pool has {self.pool.pages - 1}"
            )
        self.waiting.append(_Seq(req, next(self._sids)))

    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    def step(self) -> list[Request]:
        """One prefill pass or one decode step; the requests that finished in it."""
        self._admit()
        pending = [s for s in self.rows if s is not None and s.kv_len < s.target]
        decoding = sum(1 for s in self.rows if s is not None and s.kv_len >= s.target)
        todo = sum(s.target - s.kv_len for s in pending)
        if pending and (decoding == 0 or todo >= self.chunk // 2 or decoding < len(pending)):
            return self._prefill(pending)
        if decoding:
            return self._decode()
        if pending:
            return self._prefill(pending)
        return []

    def generate(self, requests: list[Request]) -> list[Request]:
        """Run ``requests`` to completion (in place); returns them in order."""
        for r in requests:
            self.add(r)
        with torch.no_grad():
            while self.busy():
                self.step()
        return requests

    def clear(self) -> None:
        """Drop every request and session cache (after an evaluation, or when one failed)."""
        for s in self.rows:
            if s is not None:
                self.pool.give(s.pages)
        for s in [*self.waiting, *self.cache.values()]:
            self.pool.give(s.pages)
        self.rows, self._order = [None] * self.slots, []
        self.waiting.clear()
        self.cache.clear()

    def end_session(self, session: str) -> None:
        """Free the KV kept for ``session``."""
        seq = self.cache.pop(session, None)
        if seq is not None:
            self.pool.give(seq.pages)

    # -- admission, pages, preemption --------------------------------------------------------------------
    def _next_waiting(self) -> _Seq | None:
        """A session continuation first (it holds a cache and needs few pages), else the oldest request."""
        if self.cache or any(s.pages for s in self.waiting):
            for s in self.waiting:
                if s.pages or s.req.session in self.cache:
                    return s
        return self.waiting[0] if self.waiting else None

    def _admit(self) -> None:
        free_rows = [i for i, r in enumerate(self.rows) if r is None]
        while free_rows and (seq := self._next_waiting()) is not None:
            self._reuse(seq)
            need = math.ceil(len(seq.stream()) / self.page) - len(seq.pages)
            busy = sum(1 for r in self.rows if r is not None)
            headroom = busy // 4 + 1 if busy else 0  # pages kept for the rows' next decode steps
            if not self._room(need + headroom, evict=seq.req.reused > 0 or not busy):
                break
            self.waiting.remove(seq)
            n = len(seq.stream())
            while len(seq.pages) * self.page < n:
                seq.pages.append(self.pool.take(seq.sid, len(seq.pages) * self.page))
            seq.target, seq.slot = n, free_rows.pop(0)
            self.rows[seq.slot] = seq
            self._order.append(seq.sid)

    def _reuse(self, seq: _Seq) -> None:
        """Take over the session's cached KV up to the longest common prefix (at least one token left to run)."""
        old = self.cache.pop(seq.req.session, None) if seq.req.session is not None else None
        if old is None or seq.pages:
            if old is not None:
                self.pool.give(old.pages)
            return
        new, had = seq.stream(), old.stream()[: old.kv_len]
        lcp = 0
        for a, b in zip(new[: len(new) - 1], had, strict=False):
            if a != b:
                break
            lcp += 1
        keep = math.ceil(lcp / self.page)
        self.pool.give(old.pages[keep:])
        seq.pages = old.pages[:keep]
        for p in seq.pages:
            self.pool.own(p, seq.sid, self._page_start(old, p))
        seq.kv_len = seq.req.reused = lcp
        self.stats.reused_tokens += lcp

    def _page_start(self, seq: _Seq, page: int) -> int:
        return seq.pages.index(page) * self.page

    def _room(self, need: int, evict: bool) -> bool:
        """Whether ``need`` pages are free, evicting idle session caches (oldest first) if ``evict``."""
        while len(self.pool.free) < need and evict and self.cache:
            _, seq = self.cache.popitem(last=False)
            self.pool.give(seq.pages)
            self.stats.evicted += 1
        return len(self.pool.free) >= need

    def _preempt(self, keep: _Seq) -> bool:
        """Free the latest admitted sequence other than ``keep`` (re-queued first); False if none."""
        by_sid = {s.sid: s for s in self.rows if s is not None}
        for sid in reversed(self._order):
            seq = by_sid[sid]
            if seq is keep:
                continue
            self._order.remove(sid)
            self.rows[seq.slot] = None
            self.pool.give(seq.pages)
            seq.pages, seq.kv_len, seq.target, seq.slot = [], 0, 0, -1
            self.waiting.appendleft(seq)
            self.stats.preempted += 1
            return True
        return False

    def _finish(self, seq: _Seq) -> None:
        self.rows[seq.slot] = None
        self._order.remove(seq.sid)
        seq.req.done, seq.slot = True, -1
        if seq.req.session is not None:
            stale = self.cache.pop(seq.req.session, None)
            if stale is not None:
                self.pool.give(stale.pages)
            self.cache[seq.req.session] = seq
        else:
            self.pool.give(seq.pages)

    def _sample(self, seq: _Seq, best: int) -> bool:
        """Append the next token (``best``, the argmax, unless forced); True if the request is finished."""
        r = seq.req
        r.argmax.append(best)
        tok = r.force[len(r.out)] if r.force is not None and len(r.out) < len(r.force) else best
        r.out.append(tok)
        if tok in r.stop_ids or len(r.out) >= r.max_new or (r.force is not None and len(r.out) >= len(r.force)):
            return True
        if r.stop_strings and self.tokenizer is not None:
            text = self.tokenizer.decode(r.out)
            return any(s in text for s in r.stop_strings)
        return False

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    # -- passes ------------------------------------------------------------------------------------------
    def _prefill(self, pending: list[_Seq]) -> list[Request]:
        """One packed prefill pass over up to ``chunk`` prompt tokens of the admitted sequences."""
        t0 = time.perf_counter()
        order = {sid: i for i, sid in enumerate(self._order)}
        pieces, budget = [], self.chunk
        for s in sorted(pending, key=lambda s: order[s.sid]):
            n = min(s.target - s.kv_len, budget)
            pieces.append((s, s.kv_len, s.kv_len + n))
            budget -= n
            if not budget:
                break
        real = self.chunk - budget
        size = next((x for x in self.sizes if x >= real), real)
        p = self._prefill_pass(pieces, size)
        self.pool.flush()
        h = self._run_prefill(p)
        ends = [(s, i) for (s, a, b), i in zip(pieces, _ends(pieces), strict=True) if b == s.target]
        best = self.model.lm_head(h[0, [i for _, i in ends]]).argmax(-1).tolist() if ends else []
        finished = []
        for s, a, b in pieces:
            s.kv_len = b
            self.stats.prefill_attn += (b * (b + 1) - a * (a + 1)) // 2
        for (s, _), tok in zip(ends, best, strict=True):
            if self._sample(s, tok):
                self._finish(s)
                finished.append(s.req)
        self._sync()
        st = self.stats
        st.prefill_passes, st.prefill_tokens, st.prefill_padded = (
            st.prefill_passes + 1,
            st.prefill_tokens + real,
            st.prefill_padded + size,
        )
        st.prefill_s += time.perf_counter() - t0
        return finished

    def _prefill_pass(self, pieces: list[tuple[_Seq, int, int]], size: int) -> _Pass:
        """One row of ``size`` tokens: the pieces packed, then padding; query blocks of 128 (CUDA) or one."""
        tokens, pos, seq, write = [], [], [], []
        for s, a, b in pieces:
            stream = s.stream()
            for j in range(a, b):
                tokens.append(stream[j])
                pos.append(j)
                seq.append(s.sid)
                write.append(s.pages[j // self.page] * self.page + j % self.page)
        pad = size - len(tokens)
        tokens, pos, seq, write = tokens + [0] * pad, pos + [0] * pad, seq + [-1] * pad, write + [0] * pad
        qb = 128 if self.flex else size
        pages_of = {s.sid: s for s, _, _ in pieces}
        blocks = []
        for j in range(0, size, qb):
            need: dict[int, int] = {}
            for sid, q in zip(seq[j : j + qb], pos[j : j + qb], strict=True):
                need[sid] = max(need.get(sid, 0), q // self.page + 1)
            blocks.append([pg for sid, n in need.items() for pg in (pages_of[sid].pages[:n] if sid >= 0 else [0])])
        return _Pass([tokens], [pos], [seq], [write], [blocks])

    def _run_prefill(self, p: _Pass) -> torch.Tensor:
        dev = self.pool.owner.device
        tokens, pos = torch.tensor(p.tokens, device=dev), torch.tensor(p.pos, device=dev)
        q_seq = torch.tensor(p.seq, device=dev)
        write = torch.tensor(p.write, device=dev).flatten()
        if not self.flex:
            return _layers_forward(self.model, self.pool, tokens, pos, write, _dense_attend(self.pool, p, q_seq, pos))
        return _layers_forward(self.model, self.pool, tokens, pos, write, self._flex_attend(p, q_seq, pos))

    def _flex_attend(self, p: _Pass, q_seq: torch.Tensor, q_pos: torch.Tensor) -> Callable[..., torch.Tensor]:
        """Prefill attention on CUDA: the compiled flex kernel over the pass's page lists."""
        from torch.nn.attention.flex_attention import flex_attention

        size = len(p.tokens[0])
        if size not in self._prefill_masks:  # one mask_mod (and compiled kernel) per pass length
            bufs = (
                torch.zeros(1, size, dtype=torch.long, device=q_seq.device),
                torch.zeros(1, size, dtype=torch.long, device=q_seq.device),
            )
            self._prefill_masks[size] = (*bufs, _flex_mask(self.pool, *bufs))
        seq_buf, pos_buf, mask_mod = self._prefill_masks[size]
        seq_buf.copy_(q_seq)
        pos_buf.copy_(q_pos)
        num, idx = _block_tensors(p.blocks, self.pool.pages, q_seq.device)  # fixed width: no recompiles
        mask = _block_mask(num, idx, mask_mod, 128, self.page, (size, self.pool.pages * self.page))
        if self._flex is None:
            self._flex = torch.compile(flex_attention, dynamic=False) if self.compile else flex_attention
        flex = self._flex

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return flex(q, k, v, block_mask=mask, enable_gqa=True)

        return attend

    def _decode(self) -> list[Request]:
        """One decode step: every row past its prefill feeds its last token and samples the next."""
        t0 = time.perf_counter()
        for s in list(self.rows):  # a page for each row whose next token starts one
            if s is None or s.slot < 0 or s.kv_len < s.target or s.kv_len < len(s.pages) * self.page:
                continue
            while not self._room(1, evict=True):
                if not self._preempt(keep=s):
                    raise MemoryError("the KV pool cannot hold one sequence")
            s.pages.append(self.pool.take(s.sid, len(s.pages) * self.page))
        live = [s for s in self.rows if s is not None and s.kv_len >= s.target]
        self.pool.flush()
        best = self._decode_flex(live) if self.flex else self._decode_dense(live)
        finished = []
        for s, tok in zip(live, best, strict=True):
            s.kv_len += 1
            if self._sample(s, tok):
                self._finish(s)
                finished.append(s.req)
        st = self.stats
        st.decode_steps, st.decode_tokens = st.decode_steps + 1, st.decode_tokens + len(live)
        st.decode_kv_tokens += sum(s.kv_len for s in live)
        st.decode_s += time.perf_counter() - t0
        return finished

    def _row_inputs(self, s: _Seq) -> tuple[int, int, int, int]:
        """(token, position, pool index, sequence id) of row ``s``'s next decode input."""
        j, r = s.kv_len, s.req
        tok = r.out[j - len(r.ids)] if j >= len(r.ids) else r.ids[j]
        return tok, j, s.pages[j // self.page] * self.page + j % self.page, s.sid

    def _decode_dense(self, live: list[_Seq]) -> list[int]:
        rows = [self._row_inputs(s) for s in live]
        p = _Pass(
            [[r[0]] for r in rows],
            [[r[1]] for r in rows],
            [[r[3]] for r in rows],
            [[r[2]] for r in rows],
            [[s.pages[: s.kv_len // self.page + 1]] for s in live],
        )
        h = self._run_prefill(p)
        return self.model.lm_head(h[:, 0]).argmax(-1).tolist()

    def _decode_flex(self, live: list[_Seq]) -> list[int]:
        """Fill the decoder's buffers (padding rows read and write scratch page 0), run (replay) the step."""
        d = self._decoder
        io = [[0] * self.slots, [0] * self.slots, [0] * self.slots, [-1] * self.slots]
        num = [1] * self.slots
        rows, cols, vals = [], [], []
        for s in live:
            for k, x in enumerate(self._row_inputs(s)):
                io[k][s.slot] = x
            n = s.kv_len // self.page + 1
            num[s.slot] = n
            have = d.seen.get(s.slot, (None, 0))
            first = have[1] if have[0] == s.sid else 0
            rows += [s.slot] * (n - first)
            cols += range(first, n)
            vals += s.pages[first:n]
            d.seen[s.slot] = (s.sid, n)
        for slot in [
            k
            for k, (sid, _) in d.seen.items()
            if self.rows[k] is None or self.rows[k].sid != sid or self.rows[k].kv_len < self.rows[k].target
        ]:
            d.seen.pop(slot)
            rows.append(slot)
            cols.append(0)
            vals.append(0)
        d.io.copy_(torch.tensor(io), non_blocking=True)
        d.num.view(-1).copy_(torch.tensor(num, dtype=torch.int32), non_blocking=True)
        if rows:
            dev = d.idx.device
            d.idx[torch.tensor(rows, device=dev), 0, 0, torch.tensor(cols, device=dev)] = torch.tensor(
                vals, dtype=torch.int32, device=dev
            )
        out = d.step()
        return out[[s.slot for s in live]].tolist()


def _ends(pieces: list[tuple[_Seq, int, int]]) -> list[int]:
    """Index in the pass of each piece's last token."""
    out, at = [], 0
    for _, a, b in pieces:
        at += b - a
        out.append(at - 1)
    return out
