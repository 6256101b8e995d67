"""Remixer placements: a sharded live model (device_map) and experts beside their shard or in host memory
give, after every re-mix, the reference soup bit for bit in every tensor of the live model."""

from __future__ import annotations

import pytest
import torch

from soce.soup import Remixer, SoupError, reference_soup
from soce.soup import kernel as gpu_mix
from soce.soup.placement import HOST, check_device_map, live_tensors, plan_experts, tied_keys
from tests.test_soup import load_dir, make_model

SHARDS = ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head")
CPU_SHARDS = dict.fromkeys(SHARDS, "cpu")  # distinct shards, one device: what CI can run
WEIGHTS = ({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 0.35, "b": 0.3, "c": 0.2}, {"b": 1.0}, {"a": 3.0, "c": 1.0})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, dict[str, object]]:
    """Three bf16 untied, three bf16 tied, three fp32 tiny Llamas (transformers checkpoints)."""
    d = tmp_path_factory.mktemp("rzoo")
    return {
        "bf16": {n: make_model(d / f"u{n}", s) for n, s in (("a", 11), ("b", 12), ("c", 13))},
        "tied": {n: make_model(d / f"t{n}", s, tie=True) for n, s in (("a", 21), ("b", 22), ("c", 23))},
        "fp32": {n: make_model(d / f"f{n}", s, dtype=torch.float32) for n, s in (("a", 31), ("b", 32), ("c", 33))},
    }


def expected(models: dict, ws: dict[str, float], dtype=None) -> dict[str, torch.Tensor]:
    files = {n: load_dir(p) for n, p in models.items()}
    used = [n for n in models if ws.get(n, 0) > 0]
    return {k: reference_soup([files[n][k] for n in used], [ws[n] for n in used], dtype) for k in files[used[0]]}


def assert_live_model_is(rmx: Remixer, ref: dict[str, torch.Tensor]) -> None:
    """Every parameter of the live model (tied ones through their source key) has the reference bits."""
    live = live_tensors(rmx.model)
    ties = tied_keys(rmx.model)
    names = [n for n, _ in rmx.model.named_parameters(remove_duplicate=False)]
    assert set(ref) <= set(names)
    for name in names:
        want = ref[name if name in ref else ties[name]]
        got = live[name].detach().cpu()
        assert got.dtype == want.dtype, name
        iv = torch.int16 if want.element_size() == 2 else torch.int32
        assert torch.equal(got.reshape(-1).view(iv), want.reshape(-1).view(iv)), name


PLACEMENTS = [
    pytest.param({"device": "cpu"}, id="single-cpu"),
    pytest.param({"device": "cpu", "expert_placement": "host"}, id="single-cpu-host"),
    pytest.param({"device_map": CPU_SHARDS, "expert_placement": "host"}, id="map-host"),
    pytest.param({"device_map": CPU_SHARDS, "expert_placement": "with_shard"}, id="map-with_shard"),
    pytest.param({"device_map": CPU_SHARDS}, id="map-auto"),
    pytest.param({"device_map": "auto", "max_memory": {"cpu": 1 << 30}}, id="map-transformers-auto"),
]


@pytest.mark.parametrize("kind", ["bf16", "tied", "fp32"])
@pytest.mark.parametrize("kw", PLACEMENTS)
def test_every_placement_gives_the_reference_bits(zoo, kind, kw):
    models = zoo[kind]
    rmx = Remixer(models, **kw)
    assert rmx.device == torch.device("cpu")
    for ws in WEIGHTS:
        rmx.mix(ws)
        assert_live_model_is(rmx, expected(models, ws))
    if kind == "tied":
        m = rmx.model
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_output_dtype_with_a_map(zoo):
    models = zoo["bf16"]
    rmx = Remixer(models, dtype="float32", device_map=CPU_SHARDS, expert_placement="with_shard")
    ws = {"a": 0.2, "b": 0.5, "c": 0.4}
    rmx.mix(ws)
    assert_live_model_is(rmx, expected(models, ws, torch.float32))


@pytest.mark.parametrize("preload", [None, ["LlamaMLP"]], ids=["hook-per-module", "hook-on-block"])
def test_accelerate_offloaded_model_is_remixed_in_its_host_tensors(zoo, preload):
    """A module offloaded by accelerate keeps its values in its hook's weights_map (parameters on meta), the
    hook on the module itself or on an enclosing block: the re-mix reaches them, and the next forward computes
    with the new soup."""
    from accelerate import cpu_offload

    models = zoo["tied"]
    rmx = Remixer(models, device_map=CPU_SHARDS)
    plain = Remixer(models, device="cpu")
    cpu_offload(rmx.model, execution_device=torch.device("cpu"), preload_module_classes=preload)
    mlp = rmx.model.model.layers[0].mlp
    assert hasattr(mlp if preload else mlp.up_proj, "_hf_hook") and not (preload and hasattr(mlp.up_proj, "_hf_hook"))
    assert rmx.model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    live = live_tensors(rmx.model)
    assert all(live[k].data_ptr() == t.data_ptr() for k, t in rmx.targets.items())
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    for ws in WEIGHTS:
        rmx.mix(ws)
        assert_live_model_is(rmx, expected(models, ws))
        want = plain.mix(ws)(ids).logits
        assert torch.equal(rmx.model(ids).logits, want)


def test_a_tie_placed_apart_is_remixed_as_a_copy(zoo):
    """If a device map leaves a tied parameter as a separate copy (another device), it gets the same bits."""
    models = zoo["tied"]
    rmx = Remixer(models, device="cpu")
    m = rmx.model
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())  # the tie broken, as across GPUs
    rmx.targets, rmx.aliases = Remixer._map_keys(m, rmx.ckpts[0])
    assert list(rmx.aliases) == ["model.embed_tokens.weight"]
    ws = {"a": 0.35, "b": 0.3, "c": 0.2}
    rmx.mix(ws)
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert_live_model_is(rmx, expected(models, ws))


def test_plan_experts_budget():
    g0, g1 = torch.device("cuda", 0), torch.device("cuda", 1)
    live = {"e": g0, "l0": g0, "l1": g1, "n": HOST}
    nbytes = {"e": 60, "l0": 50, "l1": 50, "n": 10}
    free = {g0: 115, g1: 200}  # budgets 105 and 190 bytes: e fits on cuda:0, then l0 no longer does
    assert plan_experts(live, nbytes, "auto", headroom=10, free=free) == {"e": g0, "l0": HOST, "l1": g1, "n": HOST}
    assert set(plan_experts(live, nbytes, "host", headroom=10, free=free).values()) == {HOST}
    with pytest.raises(SoupError, match="cuda:0's shard need"):
        plan_experts(live, nbytes, "with_shard", headroom=10, free=free)
    ok = plan_experts(live, nbytes, "with_shard", headroom=10, free={g0: 200, g1: 200})
    assert ok == {"e": g0, "l0": g0, "l1": g1, "n": HOST}
    with pytest.raises(SoupError, match="expert_placement"):
        plan_experts(live, nbytes, "gpu", free=free)


def test_device_map_errors(zoo):
    models = zoo["bf16"]
    with pytest.raises(SoupError, match="not both"):
        Remixer(models, device="cpu", device_map=CPU_SHARDS)
    with pytest.raises(SoupError, match="disk"):
        check_device_map({**CPU_SHARDS, "lm_head": "disk"})
    with pytest.raises(SoupError, match="use a dict or one of"):
        check_device_map("everywhere")
    with pytest.raises(SoupError, match="not a device"):
        check_device_map({"lm_head": "tpu:7"})
    assert check_device_map({"a": 1, "b": "cuda", "c": "cpu"}) == {"a": "cuda:1", "b": "cuda:0", "c": "cpu"}


# ----------------------------------------------------------------------------------- GPU (device machine)

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: cuda:0 + cpu shards (run on the device machine, not in CI)"
)
GPU_CPU = {
    "model.embed_tokens": "cuda:0",
    "model.rotary_emb": "cuda:0",
    "model.layers.0": "cuda:0",
    "model.layers.1": "cpu",
    "model.norm": "cpu",
    "lm_head": "cuda:0",
}
HEAD_ON_CPU = {**GPU_CPU, "lm_head": "cpu"}  # a tied lm_head placed apart from its embeddings


@needs_gpu
@pytest.mark.parametrize("kind", ["bf16", "tied", "fp32"])
@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({"device_map": GPU_CPU, "expert_placement": "with_shard"}, id="gpu+cpu-with_shard"),
        pytest.param({"device_map": GPU_CPU, "expert_placement": "host"}, id="gpu+cpu-host-pinned"),
        pytest.param(
            {"device_map": GPU_CPU, "expert_placement": "host", "pin_host": False}, id="gpu+cpu-host-pageable"
        ),
        pytest.param({"device_map": GPU_CPU}, id="gpu+cpu-auto"),
        pytest.param({"device_map": HEAD_ON_CPU, "expert_placement": "host"}, id="gpu+cpu-head-on-cpu-host"),
        pytest.param({"device": "cuda", "expert_placement": "host"}, id="single-gpu-host"),
        pytest.param({"device_map": "auto"}, id="transformers-auto"),
    ],
)
def test_gpu_placements_give_the_reference_bits(zoo, kind, kw, monkeypatch):
    import soce.soup.remix as remix

    monkeypatch.setattr(remix, "STREAM_CHUNK_ELEMS", 1000)  # many staged chunks, ragged ends
    models = zoo[kind]
    rmx = Remixer(models, **kw)
    plain = Remixer(models, device="cuda")
    ids = torch.tensor([[1, 5, 9, 3, 7]], device=rmx.device)
    for ws in WEIGHTS:
        rmx.mix(ws)
        rmx.synchronize()
        assert_live_model_is(rmx, expected(models, ws))
        got = rmx.model(ids).logits.float().cpu()
        want = plain.mix(ws)(ids.to(plain.device)).logits.float().cpu()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    if kw.get("expert_placement") == "host" and kw.get("pin_host", True):
        assert rmx._arena is not None and rmx._arena.pinned


@needs_gpu
def test_gpu_with_shard_uses_the_fused_kernel(zoo, monkeypatch):
    if gpu_mix.triton is None:
        pytest.skip("needs Triton")
    calls = []
    real = gpu_mix.fused_mix
    monkeypatch.setattr(gpu_mix, "fused_mix", lambda *a, **k: calls.append(a[0].device) or real(*a, **k))
    rmx = Remixer(zoo["bf16"], device_map=GPU_CPU, expert_placement="with_shard")
    rmx.mix({"a": 0.2, "b": 0.5, "c": 0.4})
    on_gpu = [k for k, t in rmx.targets.items() if t.device.type == "cuda"]
    assert len(calls) == len(on_gpu) and all(d.type == "cuda" for d in calls)


def test_tied_keys_without_the_expanded_map(zoo):
    """Older transformers 5.x (the GPU image has 5.17) may lack ``all_tied_weights_keys``: the class map is used
    when the config ties the embeddings, and nothing otherwise."""
    from transformers import AutoModelForCausalLM

    tied = AutoModelForCausalLM.from_pretrained(zoo["tied"]["a"])
    untied = AutoModelForCausalLM.from_pretrained(zoo["bf16"]["a"])
    want = {"lm_head.weight": "model.embed_tokens.weight"}
    assert tied_keys(tied) == want and tied_keys(untied) == {}
    for m in (tied, untied):
        m.__dict__.pop("all_tied_weights_keys", None)
        assert not hasattr(m, "all_tied_weights_keys")
    assert tied_keys(tied) == want and tied_keys(untied) == {}


@needs_gpu
def test_gpu_workers_in_threads_match_serial(zoo):
    """Two Remixers on the GPU mixed from two threads at once (first launches included: the fused kernel's
    first launch per specialisation is serialised) give the serial soups, bit for bit."""
    from soce.search import parallel

    gpu_mix._READY.clear()
    models = zoo["bf16"]
    rmxs = [Remixer(models, device="cuda"), Remixer(models, device_map=GPU_CPU, expert_placement="host")]

    def worker(rmx):
        def evaluate(ws):
            rmx.mix(ws)
            rmx.synchronize()
            return {k: t.detach().cpu().clone() for k, t in live_tensors(rmx.model).items() if k in rmx.targets}

        return evaluate

    points = [{"a": 0.1 * (i + 1), "b": 0.5, "c": 0.2} for i in range(8)]
    got = parallel.evaluate_points([worker(r) for r in rmxs], points)
    for p, sd in zip(points, got, strict=True):
        ref = expected(models, p)
        assert all(torch.equal(sd[k].view(-1).view(torch.int16), ref[k].view(-1).view(torch.int16)) for k in ref)
