"""Merge engine: bit equality with the torch reference, validation errors, tied weights, sharding, dedup,
Remixer == write_soup, atomicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from soce.soup import Remixer, SoupError, check_models, parse_size, reference_soup, write_soup
from soce.soup import kernel as gpu_mix

ROOT = Path(__file__).resolve().parents[1]


def _config(tie: bool = False, vocab: int = 96):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def make_model(
    path: Path, seed: int, *, tie: bool = False, vocab: int = 96, dtype=torch.bfloat16, shard: str | None = None
) -> Path:
    """A tiny Llama checkpoint (~0.1M params) with random weights, saved by transformers."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tie, vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.to(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "from": path.name}))
    return path


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            for k in g.keys():
                out[k] = g.get_tensor(k)
    return out


def reference(dirs: list[Path], ws: list[float], dtype=None) -> dict[str, torch.Tensor]:
    """The contract, in plain torch on whole tensors: float32 accumulator from 0, acc += w_j * t_j as a fused
    multiply-add (addcmul_) in candidate order, divided by the float32 sum of the weights unless it is 1,
    rounded to the output dtype (what mergekit 0.1.5's linear merge computes)."""
    sds = [load_dir(d) for d in dirs]
    w = torch.tensor(ws, dtype=torch.float32)
    out = {}
    for k in sds[0]:
        acc = torch.zeros(sds[0][k].shape)
        for j, sd in enumerate(sds):
            acc.addcmul_(sd[k], w[j])
        if w.sum() != 1:
            acc = acc / w.sum()
        out[k] = acc.to(dtype or sds[0][k].dtype)
        assert torch.equal(out[k], reference_soup([sd[k] for sd in sds], ws, dtype))
    return out


def assert_bits_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(
            a[k].view(torch.int16 if a[k].element_size() == 2 else torch.int32),
            b[k].view(torch.int16 if b[k].element_size() == 2 else torch.int32),
        ), k


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("zoo")
    return {
        "a": make_model(d / "a", 1),
        "b": make_model(d / "b", 2),
        "c": make_model(d / "c", 3),
        "ta": make_model(d / "ta", 4, tie=True),
        "tb": make_model(d / "tb", 5, tie=True),
        "sharded": make_model(d / "sharded", 6, shard="40KB"),
    }


def test_bit_equal_reference_and_card(zoo, tmp_path):
    models = {k: zoo[k] for k in ("a", "b", "c")}
    ws = [0.5, 0.3, 0.2]
    out = write_soup(
        models, dict(zip(models, ws, strict=True)), tmp_path / "soup", recipe={"strategy": "soce", "benchmark": "demo"}
    )
    assert_bits_equal(load_dir(out), reference(list(models.values()), ws))
    card = (out / "README.md").read_text()
    assert "soce" in card and "| b |" in card and "demo" in card
    with safe_open(out / "model.safetensors", "pt") as f:
        rec = json.loads(f.metadata()["soce_recipe"])
    assert [c["weight"] for c in rec["candidates"]] == pytest.approx(ws)
    # fused multiply-add accumulation: one rounding per term, close to exact float64 arithmetic
    k = "model.layers.0.mlp.up_proj.weight"
    exact = sum(w * load_dir(d)[k].double() for w, d in zip(ws, models.values(), strict=True))
    assert (load_dir(out)[k] == exact.to(torch.bfloat16)).float().mean() > 0.995
    assert rec["donor"] == "a" and rec["strategy"] == "soce"
    assert json.loads((out / "tokenizer_config.json").read_text())["from"] == "a"
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".soup*"))  # no temporary left


def test_workers_and_threads_do_not_change_bits(zoo, tmp_path, monkeypatch):
    import soce.soup.writer as writer

    monkeypatch.setattr(writer, "CHUNK_ELEMS", 1000)  # many chunks, ragged ends
    threads = torch.get_num_threads()
    models = {k: zoo[k] for k in ("a", "b", "c")}
    ws = {"a": 0.35, "b": 0.3, "c": 0.2}  # sum != 1: normalised by division
    outs = [load_dir(write_soup(models, ws, tmp_path / f"o{w}", workers=w)) for w in (1, 3)]
    assert_bits_equal(outs[0], outs[1])
    assert_bits_equal(outs[0], reference(list(models.values()), list(ws.values())))
    assert torch.get_num_threads() == threads  # restored


def test_unnormalised_weights_and_donor_and_dtype(zoo, tmp_path):
    models = {"a": zoo["a"], "b": zoo["b"]}
    out = write_soup(models, {"a": 3, "b": 1}, tmp_path / "s", donor="b", dtype="float32")
    assert_bits_equal(load_dir(out), reference([zoo["a"], zoo["b"]], [3, 1], torch.float32))
    assert json.loads((out / "tokenizer_config.json").read_text())["from"] == "b"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    with pytest.raises(SoupError, match="normalize"):
        write_soup(models, {"a": 3, "b": 1}, tmp_path / "s2", normalize=False)
    write_soup(models, {"a": 0.75, "b": 0.25}, tmp_path / "s3", normalize=False)


def test_negative_zero_accumulates_from_plus_zero(tmp_path):
    t = torch.tensor([-0.0, 1.0, -0.0], dtype=torch.bfloat16)
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
        save_file({"w": t.clone()}, tmp_path / n / "model.safetensors")
    out = write_soup({n: tmp_path / n for n in "ab"}, {"a": 0.5, "b": 0.5}, tmp_path / "o")
    ref = sum([0.5 * t.float(), 0.5 * t.float()]).to(torch.bfloat16)  # exact here: +0.0 where t is -0.0
    assert torch.equal(load_dir(out)["w"].view(torch.int16), ref.view(torch.int16))


def test_tied_embeddings_and_remixer_matches_disk(zoo, tmp_path):
    models = {"ta": zoo["ta"], "tb": zoo["tb"]}
    assert "lm_head.weight" not in load_dir(zoo["ta"])
    rmx = Remixer(models, device="cpu")
    for ws in ({"ta": 0.7, "tb": 0.3}, {"tb": 1.0}, {"ta": 0.2, "tb": 0.8}):
        model = rmx.mix(ws)
        full = {n: ws.get(n, 0.0) for n in models}
        disk = load_dir(write_soup(models, full, tmp_path / "s", overwrite=True))
        sd = model.state_dict()
        for k, v in disk.items():
            assert torch.equal(sd[k].view(torch.int16), v.view(torch.int16)), k
        assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    with pytest.raises(SoupError, match="not a candidate"):
        rmx.mix({"zz": 1.0})


def test_remixer_untied_dtype(zoo, tmp_path):
    models = {k: zoo[k] for k in ("a", "b", "c")}
    rmx = Remixer(models, device="cpu", dtype="float32")
    ws = {"a": 0.2, "b": 0.5, "c": 0.3}
    sd = rmx.mix(ws).state_dict()
    disk = load_dir(write_soup(models, ws, tmp_path / "s", dtype="float32"))
    for k, v in disk.items():
        assert torch.equal(sd[k], v), k


def test_sharded_input_and_output(zoo, tmp_path):
    models = {"s": zoo["sharded"], "a": zoo["a"]}
    assert (zoo["sharded"] / "model.safetensors.index.json").is_file()
    out = write_soup(models, {"s": 0.6, "a": 0.4}, tmp_path / "o", max_shard_size="30KB")
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and set(idx["weight_map"].values()) == {s.name for s in shards}
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_dir(out).values())
    assert_bits_equal(load_dir(out), reference([zoo["sharded"], zoo["a"]], [0.6, 0.4]))
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(m.state_dict()["model.norm.weight"], load_dir(out)["model.norm.weight"])


def test_duplicates_merged(zoo, tmp_path):
    models = {"a": zoo["a"], "a2": str(zoo["a"]) + "/", "b": zoo["b"]}
    assert check_models(models)["duplicates"] == {"a2": "a"}
    out = write_soup(models, {"a": 0.25, "a2": 0.25, "b": 0.5}, tmp_path / "o")
    assert_bits_equal(load_dir(out), reference([zoo["a"], zoo["b"]], [0.5, 0.5]))
    rec = json.loads((out / "soce_recipe.json").read_text())
    assert rec["duplicates_merged"] == {"a2": "a"}


def test_check_models_summary(zoo):
    s = check_models({"a": zoo["a"], "b": zoo["b"]})
    assert s["dtypes"] == {"BF16": s["tensors"]} and s["shapes"]["lm_head.weight"] == [96, 64]


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(SoupError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_validation_errors(zoo, tmp_path):
    a, b = zoo["a"], zoo["b"]
    out = tmp_path / "out"

    def ws(*names):
        return dict.fromkeys(names, 1.0)

    # vocabulary rows differ
    v = make_model(tmp_path / "v", 7, vocab=100)
    msg = _one_line_error(lambda: write_soup({"a": a, "v": v}, ws("a", "v"), out), "vocabulary")
    assert "[100, 64] != [96, 64]" in msg and str(v) in msg
    # missing tensor (tied vs untied)
    _one_line_error(lambda: write_soup({"a": a, "t": zoo["ta"]}, ws("a", "t"), out), "lm_head.weight")
    # dtype mismatch
    h = make_model(tmp_path / "h", 8, dtype=torch.float16)
    _one_line_error(lambda: write_soup({"a": a, "h": h}, ws("a", "h"), out), "dtype F16 != BF16.*output dtype")
    mixed = write_soup({"a": a, "h": h}, ws("a", "h"), tmp_path / "mixed", dtype="bfloat16")  # allowed
    assert_bits_equal(load_dir(mixed), reference([a, h], [1.0, 1.0], torch.bfloat16))
    # weights
    _one_line_error(lambda: write_soup({"a": a, "b": b}, {"a": 1.0}, out), "no weight for candidate 'b'")
    _one_line_error(lambda: write_soup({"a": a, "b": b}, {"a": 1, "b": 1, "c": 1}, out), "'c' is not a")
    _one_line_error(lambda: write_soup({"a": a, "b": b}, {"a": float("nan"), "b": 1}, out), "not finite")
    _one_line_error(lambda: write_soup({"a": a, "b": b}, {"a": float("inf"), "b": 1}, out), "not finite")
    _one_line_error(lambda: write_soup({"a": a, "b": b}, {"a": -0.1, "b": 1}, out), "negative")
    _one_line_error(lambda: write_soup({"a": a, "b": b}, {"a": 0, "b": 0}, out), "all weights are zero")
    _one_line_error(lambda: write_soup({"a": a, "b": b}, {"a": "x", "b": 1}, out), "not a number")
    _one_line_error(lambda: write_soup({}, {}, out), "no candidates")
    _one_line_error(lambda: write_soup({"a": a, "b": b}, ws("a", "b"), out, donor="q"), "donor")
    _one_line_error(lambda: write_soup({"a": a, "b": b}, ws("a", "b"), out, dtype="int4"), "dtype")
    _one_line_error(lambda: write_soup({"a": a, "b": b}, ws("a", "b"), out, max_shard_size="lots"), "shard")
    # pickle checkpoint refused with a conversion hint
    p = tmp_path / "pickle"
    p.mkdir()
    (p / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    msg = _one_line_error(lambda: write_soup({"a": a, "p": p}, ws("a", "p"), out), "pickle")
    assert "save_pretrained" in msg and "pytorch_model.bin" in msg
    # missing path, empty dir
    _one_line_error(lambda: check_models({"a": a, "x": tmp_path / "nope"}), "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: check_models({"a": a, "e": tmp_path / "empty"}), "no \\*.safetensors")
    # truncated and corrupt files
    t = tmp_path / "trunc"
    t.mkdir()
    data = (a / "model.safetensors").read_bytes()
    (t / "model.safetensors").write_bytes(data[: len(data) - 100])
    msg = _one_line_error(lambda: check_models({"a": a, "t": t}), "truncated")
    assert "model.safetensors" in msg and "tensor" in msg
    c = tmp_path / "corrupt"
    c.mkdir()
    (c / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    _one_line_error(lambda: check_models({"a": a, "c": c}), "corrupt safetensors header")
    # shard listed in the index missing
    s = tmp_path / "shardmiss"
    s.mkdir()
    (s / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    _one_line_error(lambda: check_models({"a": a, "s": s}), "missing")
    # model_type differs
    m = tmp_path / "mt"
    m.mkdir()
    for f in a.iterdir():
        (m / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (m / "config.json").write_text(json.dumps(cfg))
    _one_line_error(lambda: check_models({"a": a, "m": m}), "model_type")
    # integer buffers must agree
    for n, val in (("i1", 1), ("i2", 2)):
        (tmp_path / n).mkdir()
        save_file({"w": torch.ones(4), "pos": torch.full((3,), val)}, tmp_path / n / "model.safetensors")
    _one_line_error(
        lambda: write_soup({"i1": tmp_path / "i1", "i2": tmp_path / "i2"}, ws("i1", "i2"), out), "cannot be averaged"
    )
    # output exists / overlaps a candidate
    out.mkdir(exist_ok=True)
    _one_line_error(lambda: write_soup({"a": a, "b": b}, ws("a", "b"), out), "exists")
    _one_line_error(lambda: write_soup({"a": a, "b": b}, ws("a", "b"), a, overwrite=True), "overlaps")
    assert not any(out.iterdir()) and not list(tmp_path.glob(".out*"))  # nothing written by failures


def test_overwrite_replaces_a_soup_or_an_empty_directory(zoo, tmp_path):
    models = {"a": zoo["a"], "b": zoo["b"]}
    out = tmp_path / "o"
    write_soup(models, {"a": 1, "b": 3}, out)
    (out / "stale.txt").write_text("x")  # an earlier soup, with a file of its own
    write_soup(models, {"a": 1, "b": 1}, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
    (tmp_path / "empty").mkdir()
    assert (write_soup(models, {"a": 1, "b": 1}, tmp_path / "empty", overwrite=True) / "model.safetensors").is_file()


@pytest.mark.parametrize("what", ["dir", "file"])
def test_overwrite_never_replaces_what_soce_did_not_write(zoo, tmp_path, what):
    """overwrite=true on a user's folder (a typo: output=~) or file: refused in one line, every byte kept."""
    out = tmp_path / "mine"
    if what == "dir":
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    else:
        out.write_text("precious")
    _one_line_error(
        lambda: write_soup({"a": zoo["a"], "b": zoo["b"]}, {"a": 1, "b": 1}, out, overwrite=True),
        "not a soup soce wrote",
    )
    assert (out / "notes.txt" if what == "dir" else out).read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 << 20 and parse_size(17) == 17
    assert parse_size("1000") == 1000


def test_sigkill_mid_write_leaves_no_target(tmp_path):
    """A merge killed with SIGKILL while writing leaves nothing at the target; the next merge cleans up."""
    big = {}
    for n in ("x", "y"):
        (tmp_path / n).mkdir()
        save_file(
            {f"w{i}": torch.randn(1 << 20).to(torch.bfloat16) for i in range(24)}, tmp_path / n / "model.safetensors"
        )
        big[n] = str(tmp_path / n)
    out = tmp_path / "soup"
    code = (
        "import sys, soce.soup.writer as s\n"
        "orig = s._write_all\n"
        "def slow(*a, **k):\n"
        "    orig(*a, **k); print('chunk', flush=True); import time; time.sleep(0.05)\n"
        "s._write_all = slow\n"
        f"s.write_soup({big!r}, {{'x': 1, 'y': 1}}, {str(out)!r}, max_shard_size='8MB')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT, text=True)
    for _ in range(3):
        assert proc.stdout.readline().startswith("chunk")
    tmps = list(tmp_path.glob(".soup.soce-tmp-*"))
    assert len(tmps) == 1 and any(tmps[0].iterdir())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.05)
    assert not out.exists()
    write_soup(big, {"x": 1, "y": 1}, out)  # a later merge succeeds and removes the orphan
    assert out.is_dir() and not list(tmp_path.glob(".soup.*"))


# Where a replacing merge is stopped by SIGKILL, and what the target must then hold: the old soup, or the
# new one, whole; "aside" is the portable fallback between its two renames, where the target is missing on
# disk until the next write into the directory puts the old one back.
_STAGES = {
    "write": ("", "_write_all", 3, "old"),  # mid-write
    "publish": ("", "publish", 1, "old"),  # everything written and fsynced, not yet published
    "exchanged": ("", "remove", 1, "new"),  # RENAME_EXCHANGE done, old not yet deleted
    "aside": ("p.USE_RENAMEAT2 = False", "rename", 2, "old"),  # fallback: old renamed aside, new not in
    "renamed": ("p.USE_RENAMEAT2 = False", "remove", 1, "new"),  # fallback: new in, old not yet deleted
}
_KILLED = """
import sys, time, soce.soup.writer as w, soce.soup.publish as p
{setup}
mod = w if {fn!r} == "_write_all" else p
orig, calls = getattr(mod, {fn!r}), []
def stop(*a, **k):
    calls.append(1)
    if len(calls) == {nth}:
        print("stopped", flush=True); time.sleep(600)
    return orig(*a, **k)
setattr(mod, {fn!r}, stop)
w.write_soup({models!r}, {{'x': 1, 'y': 1}}, {out!r}, max_shard_size='1MB', overwrite=True)
"""


def _bits(d: Path) -> dict[str, bytes]:
    return {k: t.view(torch.uint8).numpy().tobytes() for k, t in load_dir(d).items()}


@pytest.mark.parametrize("stage", list(_STAGES))
def test_sigkill_at_every_stage_keeps_the_target(tmp_path, stage):
    """A merge that replaces an existing soup, killed at each stage of its publication: the target is the
    old soup or the new one, whole (or, in the fallback between its renames, restored by the next run)."""
    from soce.soup import publish

    models = {}
    for n in ("x", "y"):
        (tmp_path / n).mkdir()
        save_file({f"w{i}": torch.randn(1 << 18).to(torch.bfloat16) for i in range(6)}, tmp_path / n / "m.safetensors")
        models[n] = str(tmp_path / n)
    out = tmp_path / "soup"
    old = _bits(write_soup(models, {"x": 3, "y": 1}, out, max_shard_size="1MB"))
    new = _bits(write_soup(models, {"x": 1, "y": 1}, tmp_path / "ref", max_shard_size="1MB"))
    setup, fn, nth, expect = _STAGES[stage]
    code = _KILLED.format(setup=setup, fn=fn, nth=nth, models=models, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT, text=True)
    assert proc.stdout.readline().startswith("stopped")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    if stage == "aside":
        assert not out.exists() and len(list(tmp_path.glob(".soup.soce-old-*"))) == 1
        assert publish.recover(tmp_path)[0].startswith(f"restored {out}")
    if stage == "exchanged":  # one atomic swap: the old soup now sits under the temporary name
        (swapped,) = tmp_path.glob(".soup.soce-tmp-*")
        assert _bits(swapped) == old and not list(tmp_path.glob(".soup.soce-old-*"))
    assert _bits(out) == (old if expect == "old" else new), stage
    write_soup(models, {"x": 1, "y": 1}, out, max_shard_size="1MB", overwrite=True)  # cleans up, then works
    assert _bits(out) == new and not list(tmp_path.glob(".soup.*"))


needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and gpu_mix.triton is not None),
    reason="needs a CUDA GPU and Triton (runs on the device machine, not in CI)",
)


def test_fused_mix_off_the_gpu_declines():
    assert not gpu_mix.available(torch.device("cpu"))
    t = torch.zeros(4, dtype=torch.float64)
    assert not gpu_mix.fused_mix(t, [t, t], torch.ones(2), None)  # float64: mix_into's job


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_fused_mix_bit_equal_to_mix_into(dtype, k):
    from soce.soup import Coefficients, mix_into

    dev = torch.device("cuda")
    n = 1_000_003  # not a multiple of the block
    g = torch.Generator(device=dev).manual_seed(k)
    srcs = [torch.randn(n, generator=g, device=dev).to(dtype) for _ in range(k)]
    srcs[0][:7] = -0.0
    for ws in ([1 / k] * k, [0.3 + 0.1 * j for j in range(k)]):  # summing to 1 (or nearly) and not
        co = Coefficients.make(ws, torch.float32, dev)
        ref = torch.empty(n, dtype=dtype, device=dev)
        mix_into(ref, srcs, co, torch.empty(n, device=dev))
        got = torch.empty(n, dtype=dtype, device=dev)
        assert gpu_mix.fused_mix(got, srcs, torch.cat(co.ws), co.den)
        iview = torch.int16 if dtype.itemsize == 2 else torch.int32
        assert torch.equal(got.view(iview), ref.view(iview)), (k, ws, dtype)


@needs_gpu
def test_remixer_fused_equals_unfused_and_disk(zoo, tmp_path, monkeypatch):
    models = {k: zoo[k] for k in ("a", "b", "c")}
    ws = {"a": 0.2, "b": 0.5, "c": 0.4}
    disk = load_dir(write_soup(models, ws, tmp_path / "s"))
    calls = []
    real = gpu_mix.fused_mix
    monkeypatch.setattr(gpu_mix, "fused_mix", lambda *a, **k: calls.append(1) or real(*a, **k))
    for flag in ("1", "0"):
        monkeypatch.setenv("SOCE_FUSED_MIX", flag)
        rmx = Remixer(models, device="cuda")
        sd = rmx.mix(ws).state_dict()
        for k, v in disk.items():
            assert torch.equal(sd[k].cpu().view(torch.int16), v.view(torch.int16)), (flag, k)
        # every averaged tensor goes through the fused kernel when on, none when off
        assert len(calls) == (len(rmx.targets) if flag == "1" else 0), (flag, len(calls))
        calls.clear()


def _variant(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint ``src`` whose config.json has ``changes`` (same tensors: shapes cannot tell)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"num_attention_heads": 8, "head_dim": 8}, "head_dim"),  # same shapes, other attention
        ({"rope_theta": 500000.0}, "rope_theta"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1.0}}, "rope_parameters"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ],
)
def test_candidates_differing_in_the_architecture_are_refused_naming_the_key(zoo, tmp_path, changes, key):
    v = _variant(zoo["a"], tmp_path / "v", **changes)
    msg = _one_line_error(lambda: check_models({"a": zoo["a"], "v": v}), f"differ in '{key}', which defines")
    assert "a: " in msg and "v: " in msg
    with pytest.raises(SoupError, match=key):
        write_soup({"a": zoo["a"], "v": v}, {"a": 0.5, "v": 0.5}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_config_differences_warn_once_and_keep_the_donors(zoo, tmp_path, caplog):
    import logging

    v = _variant(zoo["a"], tmp_path / "v", eos_token_id=7, max_position_embeddings=128, transformers_version="9.9")
    with caplog.at_level(logging.WARNING, logger="soce.soup.checks"):
        write_soup({"a": zoo["a"], "v": v}, {"a": 0.5, "v": 0.5}, tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if "config.json differ" in r.getMessage()]
    assert len(warnings) == 1 and all(
        k in warnings[0]
        for k in ("eos_token_id", "max_position_embeddings", "transformers_version", "donor's values are kept")
    )
    kept = json.loads((tmp_path / "out" / "config.json").read_text())
    assert kept["max_position_embeddings"] == 64 and kept.get("eos_token_id") != 7
