"""Merge operators (task_arithmetic, ties, dare_*): bits against a reference restating mergekit 0.1.5's
formulas on whole tensors, the writer and the Remixer against it, DARE's masks and rescale, the CLI's checks,
and (on a GPU) CPU == GPU bits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from soce.merge import main
from soce.soup import Remixer, SoupError, task_kernel, write_soup
from soce.soup.operators import OPERATORS, MergeSpec, dare, sort_cut, ties
from soce.soup.operators.task_vectors import (
    Prepared,
    TaskCoefficients,
    merge_tensor,
    mix_chunk,
    pack_bits,
    unpack_bits,
)
from tests.test_soup import assert_bits_equal, load_dir, make_model

CONSENSUS = {"ties", "dare_ties"}


def reference(
    method: str,
    base: torch.Tensor,
    xs: list[torch.Tensor],
    ws: list[float],
    *,
    density: float = 1.0,
    lam: float = 1.0,
    normalize: bool | None = None,
    rescale: bool = False,
    masks: list[torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """mergekit 0.1.5's generalized task arithmetic restated on whole tensors in float32 (``dtype: float32``,
    ``out_dtype`` = ``dtype``): task vectors, sparsified (TIES: argsort of the magnitudes; DARE: the given
    ``masks``, L1 rescale with float64 norms), stacked, times the weights, consensus or plain sum over dim
    0, normalised, times lambda, plus the base, rounded once."""
    normalize = OPERATORS[method].normalize if normalize is None else normalize
    b = base.float()
    deltas = []
    for j, x in enumerate(xs):
        d = x.float() - b
        keep = None
        if method == "ties" and density < 1:
            keep = torch.zeros(d.numel())
            if density > 0:  # mergekit: density <= 0 keeps nothing
                keep[torch.argsort(d.abs().reshape(-1), descending=True)[: max(1, int(density * d.numel()))]] = 1
            keep = keep.reshape(d.shape)
        elif masks is not None and density < 1:
            keep = masks[j].reshape(d.shape).float()
        if keep is not None:
            masked = d * keep
            before, after = d.double().abs().sum().float(), masked.double().abs().sum().float()
            d = masked * (before / after) if rescale and before >= 1e-7 and after >= 1e-7 else masked
        deltas.append(d)
    stack = torch.stack(deltas)
    w = torch.tensor(ws, dtype=torch.float32).reshape(-1, *([1] * base.dim()))
    stack = stack * w
    if method in CONSENSUS:
        sign = (stack.sum(dim=0) >= 0).float() * 2 - 1
        agree = stack.sign() == sign
        mixed, div = (stack * agree).sum(dim=0), (w * agree).sum(dim=0)
        div[div == 0] = 1
    else:
        mixed, div = stack.sum(dim=0), w.sum(dim=0)
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    if lam != 1:
        mixed = mixed * lam
    return (b + mixed).to(dtype or base.dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _tensors(seed: int, shape: tuple[int, ...], n: int, dtype: torch.dtype) -> tuple[torch.Tensor, list]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    xs = [(base.float() + torch.randn(shape, generator=g) * 0.002 * (j + 1)).to(dtype) for j in range(n)]
    return base, xs


CASES = [  # method, weights, density, lambda, normalize
    ("task_arithmetic", [0.5, 0.3, 0.2], 1.0, 1.0, None),
    ("task_arithmetic", [0.4, 0.3, 0.2, 0.1], 1.0, 0.7, True),
    ("task_arithmetic", [1.0, 1.0], 1.0, 1.3, None),
    ("ties", [0.5, 0.3, 0.2], 0.5, 1.0, None),
    ("ties", [0.4, 0.3, 0.2, 0.1], 0.2, 1.0, None),
    ("ties", [0.6, 0.3, 0.1], 0.7, 0.8, False),
    ("ties", [1.0, 2.0, 0.5, 0.25], 0.33, 1.0, True),
    ("ties", [0.7, 0.3], 0.0, 1.0, None),
    ("task_arithmetic", [0.7, -0.3, 0.4], 1.0, 1.0, True),  # negation: a negative weight
    ("ties", [0.6, -0.2, 0.5], 0.5, 1.0, None),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{len(c[1])}-{c[2]}")
def test_equals_the_published_formulas(case, dtype):
    method, ws, density, lam, norm = case
    spec = MergeSpec(method, density=density, lam=lam, normalize=norm)
    for si, shape in enumerate([(64, 48), (4096,), (129, 33)]):  # 129*33: not a multiple of 32
        base, xs = _tensors(si, shape, len(ws), dtype)
        names = [f"m{j}" for j in range(len(ws))]
        for out_dt in {dtype, torch.float32}:
            ref = reference(method, base, xs, ws, density=density, lam=lam, normalize=norm, dtype=out_dt)
            for chunk in (1 << 18, 1000, 8):
                got = merge_tensor(spec, "t", names, base, xs, ws, out_dt, chunk)
                assert torch.equal(_bits(got), _bits(ref)), (shape, out_dt, chunk)


def test_ties_rescale_and_float64():
    base, xs = _tensors(5, (120, 70), 3, torch.float32)
    ws = [0.5, 0.3, 0.2]
    spec = MergeSpec("ties", density=0.3, rescale=True)
    ref = reference("ties", base, xs, ws, density=0.3, rescale=True)
    assert torch.equal(_bits(merge_tensor(spec, "t", list("abc"), base, xs, ws, None, 1000)), _bits(ref))
    b64, x64 = base.double(), [x.double() for x in xs]  # float64 inputs: float64 arithmetic, any chunking
    outs = [merge_tensor(spec, "t", list("abc"), b64, x64, ws, None, c) for c in (1 << 18, 999)]
    assert outs[0].dtype == torch.float64 and torch.equal(_bits(outs[0]), _bits(outs[1]))
    assert (outs[0] - ref.double()).abs().max() < 1e-6


def _argsort_mask(mag: torch.Tensor, k: int) -> torch.Tensor:
    want = torch.zeros(mag.numel(), dtype=torch.bool)
    want[torch.argsort(mag, descending=True)[:k]] = True  # mergekit's choice: torch's unstable CPU sort
    return want


def _keys(mag: torch.Tensor) -> torch.Tensor:
    keys = torch.empty(mag.numel(), dtype=torch.int64)
    sort_cut.pack(mag, 0, keys)
    return keys


def test_trim_keeps_argsorts_choice_and_puts_the_kept_first():
    g = torch.Generator().manual_seed(0)
    for n in (1000, 300_001):  # bf16-rounded magnitudes: many ties at the cut
        mag = torch.randn(n, generator=g).to(torch.bfloat16).float().abs()
        for density in (0.1, 0.5, 0.9):
            k = ties.trim_k(density, n)
            keys = _keys(mag)
            got = ties.trim_mask(keys, density)
            assert torch.equal(got, _argsort_mask(mag, k)) and int(got.sum()) == k
            kept = sort_cut.values(keys[:k])
            assert torch.equal(kept.sort().values, mag[got].sort().values)  # kept entries first
    assert ties.trim_mask(_keys(torch.ones(10)), 1.0) is None and ties.trim_k(0.01, 10) == 1 and ties.trim_k(0, 10) == 0
    assert not ties.trim_mask(_keys(torch.ones(10)), 0.0).any()


@pytest.mark.parametrize("scan", [1, 7, 1 << 16])
def test_sort_cut_replays_torchs_unstable_sort(monkeypatch, scan):
    """Every size (short runs included), few or many distinct values, every cut, scans of any block size:
    the replay selects exactly the entries torch's argsort(descending=True) puts first."""
    monkeypatch.setattr(sort_cut, "SCAN", scan)
    g = torch.Generator().manual_seed(scan)
    assert sort_cut.replay_matches_torch()
    for _ in range(150 if scan > 1 else 40):
        n = int(torch.randint(1, 2500, (1,), generator=g))
        levels = int(torch.randint(1, 60, (1,), generator=g))
        mag = torch.randint(0, levels, (n,), generator=g).float() * 0.25
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        assert torch.equal(sort_cut.first_k(_keys(mag), k), _argsort_mask(mag, k)), (n, levels, k)


def test_sort_cut_falls_back_to_torchs_sort(monkeypatch):
    """NaN magnitudes, the heapsort switch (depth limit) and a torch whose sort differs: torch sorts, same set."""
    g = torch.Generator().manual_seed(3)
    mag = torch.randint(0, 9, (5000,), generator=g).float()
    mag[17] = float("nan")
    assert torch.equal(sort_cut.first_k(_keys(mag), 2000), _argsort_mask(mag, 2000))
    mag[17] = 1.0
    monkeypatch.setattr(sort_cut, "depth_limit", lambda n: 2)  # heapsort after two partitions: keys half moved
    keys = _keys(mag)
    assert not sort_cut._replay(_keys(mag).numpy(), 2000)
    assert torch.equal(sort_cut.first_k(keys, 2000), _argsort_mask(mag, 2000))
    assert torch.equal(sort_cut.values(keys), mag[torch.argsort(mag, descending=True)])
    monkeypatch.setattr(sort_cut, "replay_matches_torch", lambda: False)
    assert torch.equal(sort_cut.first_k(_keys(mag), 1234), _argsort_mask(mag, 1234))


def test_pack_bits_round_trip():
    m = torch.rand(1003, generator=torch.Generator().manual_seed(1)) < 0.3
    p = pack_bits(m)
    assert p.dtype == torch.uint8 and p.numel() == 126
    for s, n in ((0, 1003), (5, 100), (8, 995), (1000, 3)):
        assert torch.equal(unpack_bits(p, s, n, "cpu"), m[s : s + n])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dare_given_the_masks_equals_the_formula(method, dtype):
    ws, names = [0.5, 0.3, 0.2], ["a", "b", "c"]
    base, xs = _tensors(7, (96, 64), 3, dtype)
    for density, rescale, seed in ((0.5, True, 0), (0.2, True, 3), (0.7, False, 0), (1.0, True, 0)):
        spec = MergeSpec(method, density=density, rescale=rescale, seed=seed, lam=0.9)
        masks = [dare.keep_mask(dare.salt(seed, "w", nm), density, 0, base.numel()) for nm in names]
        ref = reference(method, base, xs, ws, density=density, rescale=rescale, masks=masks, lam=0.9)
        for chunk in (1 << 18, 777):
            assert torch.equal(_bits(merge_tensor(spec, "w", names, base, xs, ws, None, chunk)), _bits(ref))


def test_dare_masks_kept_fraction_and_rescale():
    n = 1 << 20
    for density in (0.1, 0.5, 0.9):
        s = dare.salt(0, "model.layers.0.mlp.up_proj.weight", "expert")
        m = dare.keep_mask(s, density, 0, n)
        assert abs(m.float().mean().item() - density) < 4 * (density * (1 - density) / n) ** 0.5
        assert torch.equal(m[12345:23456], dare.keep_mask(s, density, 12345, 11111))  # chunking-free
        assert torch.equal(m, dare.keep_mask(s, density, 0, n))  # same every run
    a = dare.keep_mask(dare.salt(0, "k", "x"), 0.5, 0, 4096)
    assert not torch.equal(a, dare.keep_mask(dare.salt(1, "k", "x"), 0.5, 0, 4096))  # seed matters
    assert not torch.equal(a, dare.keep_mask(dare.salt(0, "k", "y"), 0.5, 0, 4096))  # candidate matters
    # rescale: the kept entries scaled back to the task vector's L1 norm
    base, (x,) = _tensors(3, (256, 256), 1, torch.float32)
    spec = MergeSpec("dare_linear", density=0.3)
    out = merge_tensor(spec, "w", ["x"], base, [x], [1.0])
    tau, kept = (x - base).abs().sum().item(), (out - base).abs().sum().item()
    assert abs(kept - tau) < 1e-3 * tau
    assert ((out - base) != 0).float().mean().item() == pytest.approx(0.3, abs=0.01)


def test_exact_l1():
    from fractions import Fraction

    g = torch.Generator().manual_seed(0)
    for t in (
        torch.randn(10_000, generator=g) * torch.logspace(-30, 10, 10_000),
        torch.randn(5000, generator=g, dtype=torch.float64),
        torch.tensor([1e-45, 3.0, -2.5]),
    ):
        exact = sum(Fraction(abs(v)) for v in t.tolist())
        want = torch.tensor(float(exact), dtype=torch.float64).to(t.dtype).item()  # exact -> double -> dtype
        assert dare.l1_value(dare.l1_parts(t), t.dtype) == pytest.approx(want, rel=1e-15)
    assert dare.l1_value(dare.l1_parts(torch.tensor([1.0, float("inf")])), torch.float32) != 1.0


def test_spec_checks():
    assert MergeSpec("ties").params() == {
        "method": "ties",
        "density": 1.0,
        "lambda": 1.0,
        "normalize": True,
        "rescale": False,
    }
    assert MergeSpec.from_mapping({"method": "dare_ties", "lambda": 0.5}).lam == 0.5
    for bad, msg in (
        ({"method": "slerp"}, "unknown"),
        ({"method": "linear", "density": 0.5}, "takes no 'density'"),
        ({"method": "ties", "foo": 1}, "unknown parameter"),
    ):
        with pytest.raises(ValueError, match=msg):
            MergeSpec.from_mapping(bad)
    assert "density" in MergeSpec("ties", density=1.5).problem()
    assert "lambda" in MergeSpec("ties", lam=float("nan")).problem()
    assert "seed" in MergeSpec("dare_ties", seed=-1).problem()


def test_config_schema_lists_the_registry():
    from soce.config import MERGE_METHODS

    assert MERGE_METHODS == {name: op.params for name, op in OPERATORS.items()}
    confs = {p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "merge").glob("*.yaml")}
    assert confs == set(OPERATORS)


# ------------------------------------------------------------------------------ engines


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A base and three 'fine-tunes' (base + small noise), tiny Llama, bf16."""
    d = tmp_path_factory.mktemp("family")
    base = make_model(d / "base", 0)
    out = {"base": base}
    sd = load_dir(base)
    for j, name in enumerate(("a", "b", "c")):
        g = torch.Generator().manual_seed(10 + j)
        (d / name).mkdir()
        ft = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.01).to(v.dtype) for k, v in sd.items()}
        save_file(ft, d / name / "model.safetensors", metadata={"format": "pt"})
        for f in ("config.json", "generation_config.json", "tokenizer_config.json"):
            if (base / f).is_file():
                (d / name / f).write_text((base / f).read_text())
        out[name] = d / name
    return out


def _expected(family: dict[str, Path], spec: MergeSpec, ws: dict[str, float]) -> dict[str, torch.Tensor]:
    sds = {n: load_dir(family[n]) for n in ws}
    base = load_dir(family["base"])
    return {k: merge_tensor(spec, k, list(ws), base[k], [sds[n][k] for n in ws], list(ws.values())) for k in base}


@pytest.mark.parametrize(
    "merge",
    [
        {"method": "task_arithmetic", "lambda": 0.8},
        {"method": "ties", "density": 0.4},
        {"method": "dare_ties", "density": 0.5, "seed": 2},
        {"method": "dare_linear", "density": 0.6, "rescale": False},
    ],
    ids=lambda m: m["method"],
)
def test_writer_and_remixer_equal_the_reference(family, tmp_path, merge):
    ws = {"a": 0.5, "b": 0.3, "c": 0.2}
    spec = MergeSpec.from_mapping(merge)
    want = _expected(family, spec, ws)
    models = {n: family[n] for n in ws}
    for workers in (1, 3):
        out = write_soup(models, ws, tmp_path / f"o{workers}", merge=merge, base=family["base"], workers=workers)
        assert_bits_equal(load_dir(out), want)
    rec = json.loads((out / "soce_recipe.json").read_text())
    assert rec["method"] == spec.method and rec["merge"] == spec.params() and rec["base"] == str(family["base"])
    card = (out / "README.md").read_text()
    # a local base is no hub id: named in the card's text and recipe, not in its hub front matter (issue 21)
    assert f"Operator **{spec.method}**" in card and str(family["base"]) in card.split("---", 2)[2]
    assert "=True" not in card and "=False" not in card  # parameters as the command line writes them
    assert str(family["base"]) not in card.split("---")[1]
    rmx = Remixer(models, device="cpu", merge=merge, base=family["base"])
    sd = rmx.mix(ws).state_dict()
    for k, v in want.items():
        assert torch.equal(_bits(sd[k]), _bits(v)), k
    sub = {"a": 0.6, "c": 0.4}  # a subset, as a search point that drops an expert
    sd = rmx.mix(sub).state_dict()
    ref_sub = _expected(family, spec, sub)
    assert all(torch.equal(_bits(sd[k]), _bits(v)) for k, v in ref_sub.items())


@pytest.mark.parametrize(
    "merge", [{"method": "task_arithmetic"}, {"method": "ties", "density": 0.5}], ids=lambda m: m["method"]
)
def test_negative_weights_subtract_task_vectors(family, tmp_path, merge):
    """Task arithmetic's negation (mergekit allows negative weights): writer and Remixer equal the formulas;
    the linear soup still refuses them, in one line."""
    ws = {"a": 0.8, "b": -0.3, "c": 0.5}
    spec = MergeSpec.from_mapping(merge)
    want = _expected(family, spec, ws)
    models = {n: family[n] for n in ws}
    assert_bits_equal(load_dir(write_soup(models, ws, tmp_path / "o", merge=merge, base=family["base"])), want)
    sd = Remixer(models, device="cpu", merge=merge, base=family["base"]).mix(ws).state_dict()
    assert all(torch.equal(_bits(sd[k]), _bits(v)) for k, v in want.items())
    with pytest.raises(SoupError, match="linear soup takes non-negative weights") as e:
        write_soup(models, ws, tmp_path / "lin")
    assert "\n" not in str(e.value) and not (tmp_path / "lin").exists()


def test_linear_ignores_the_base_and_is_unchanged(family, tmp_path):
    ws = {"a": 0.5, "b": 0.5}
    models = {n: family[n] for n in ws}
    plain = load_dir(write_soup(models, ws, tmp_path / "p"))
    assert_bits_equal(
        load_dir(write_soup(models, ws, tmp_path / "l", merge={"method": "linear"}, base=family["base"])), plain
    )


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("soce.merge: error:") and err.count("\n") == 1, err
    return err


def test_cli_operators_and_their_input_checks(family, tmp_path, capsys):
    a, b, c, base = (family[n] for n in ("a", "b", "c", "base"))
    out = tmp_path / "t"
    args = [f"output={out}", f"models=[{a},{b},{c}]", "weights=[0.5,0.3,0.2]"]
    assert main(["method=ties", f"base={base}", *args, "density=0.5", "lambda=1.0", "normalize=true"]) == 0
    rec = json.loads((out / "soce_recipe.json").read_text())
    assert rec["merge"] == {"method": "ties", "density": 0.5, "lambda": 1.0, "normalize": True, "rescale": False}
    capsys.readouterr()
    bad_shape = make_model(tmp_path / "v", 9, vocab=100)
    nan = tmp_path / "nan"
    nan.mkdir()
    sd = load_dir(base)
    sd["model.norm.weight"][3] = float("nan")
    save_file(sd, nan / "model.safetensors")
    capsys.readouterr()
    for extra, msg in (
        (["method=ties"], "needs a base checkpoint"),
        (["method=ties", f"base={bad_shape}"], "vocabulary rows differ"),
        (["method=ties", f"base={nan}"], f"{nan}.*nan"),
        (["method=linear", "density=0.5"], "takes no 'density'"),
        ([f"base={base}"], "linear averages the models and takes no base"),
        (["method=tie", f"base={base}"], "^soce.merge: error: merge method 'tie': unknown"),
        (["method=ties", f"base={tmp_path / 'none'}"], "the base checkpoint does not exist"),
        (["method=ties", f"base={base}", "density=2"], "density"),
        (["method=bogus", f"base={base}"], "unknown"),
    ):
        o = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        assert main([*extra, f"output={o}", f"models=[{a},{b}]", "weights=[0.5,0.5]"]) == 2, extra
        assert re.search(msg, _err(capsys), flags=re.IGNORECASE), extra
        assert not o.exists() and not [p for p in tmp_path.iterdir() if "soce-tmp" in p.name]
    assert (
        main(["method=ties", f"base={base}", f"output={base}", f"models=[{a},{b}]", "weights=[1,1]", "overwrite=true"])
        == 2
    )
    assert "overlaps" in _err(capsys)
    with pytest.raises(SoupError, match="needs a base"):
        Remixer({"a": a, "b": b}, device="cpu", merge={"method": "task_arithmetic"})


# ------------------------------------------------------------------------------ GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the device machine)")


@needs_cuda
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_bits_equal_cpu(method, dtype):
    ws = [0.4, 0.3, 0.2, 0.1]
    names = ["a", "b", "c", "d"]
    spec = MergeSpec(method, density=0.5 if method != "task_arithmetic" else 1.0, lam=0.9)
    base, xs = _tensors(11, (1031, 517), 4, dtype)
    cpu = merge_tensor(spec, "w", names, base, xs, ws)
    gpu = merge_tensor(spec, "w", names, base.cuda(), [x.cuda() for x in xs], ws, None, 1 << 20)
    assert torch.equal(_bits(gpu.cpu()), _bits(cpu))


@needs_cuda
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_gpu_remixer_equals_writer(family, tmp_path, method):
    ws = {"a": 0.5, "b": 0.3, "c": 0.2}
    merge = {"method": method, **({"density": 0.5} if method != "task_arithmetic" else {})}
    models = {n: family[n] for n in ws}
    disk = load_dir(write_soup(models, ws, tmp_path / "s", merge=merge, base=family["base"]))
    for placement in (None, "host"):
        rmx = Remixer(models, device="cuda", merge=merge, base=family["base"], expert_placement=placement)
        sd = rmx.mix(ws).state_dict()
        for k, v in disk.items():
            assert torch.equal(_bits(sd[k].cpu()), _bits(v)), (placement, k)


def test_fused_task_kernel_declines_off_the_gpu_and_for_dare():
    spec = MergeSpec("ties", density=0.5)
    assert not task_kernel.applies(spec, torch.device("cpu"), 3, [None] * 3)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        assert task_kernel.applies(spec, dev, 3, [None] * 3)
        assert not task_kernel.applies(MergeSpec("dare_ties", density=0.5), dev, 3, [(1, 2)] * 3)  # DARE: mix_chunk
        assert not task_kernel.applies(spec, dev, task_kernel.MAX_SOURCES + 1, [None] * 9)


FUSED_CASES = [  # method, density, lambda, normalize, rescale factors
    ("task_arithmetic", 1.0, 1.0, None, False),
    ("task_arithmetic", 1.0, 0.7, True, False),
    ("ties", 0.5, 1.0, None, False),
    ("ties", 0.3, 0.8, False, True),
    ("ties", 0.2, 1.3, True, True),
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{c[4]}")
def test_fused_task_kernel_bit_equal_to_mix_chunk(case, k, dtype):
    """The kernel against mix_chunk on the GPU, on a slice that starts off a byte of the trim bits
    (start 13) and ends off a block, with zero task-vector entries and negative zeros, for every output dtype."""
    method, density, lam, norm, scaled = case
    spec = MergeSpec(method, density=density, lam=lam, normalize=norm)
    dev = torch.device("cuda")
    total, start = 1_000_003, 13
    base, xs = _tensors(k, (total,), k, dtype)
    base[:40] = -0.0
    xs[0][:20] = base[:20]  # zero task vector
    xs[-1][20:30] = -0.0
    ws = [0.1 + 0.23 * j for j in range(k)]
    names = [f"m{j}" for j in range(k)]
    g = torch.Generator().manual_seed(k)
    masks = [pack_bits(torch.rand(total, generator=g) < density) if density < 1 else None for _ in range(k)]
    scales = [torch.tensor([1.0 + 0.37 * j]) if scaled else None for j in range(k)]
    prep = Prepared(masks, [None] * k, scales).to(dev)
    sl = slice(start, total)
    srcs, b = [x[sl].to(dev) for x in xs], base[sl].to(dev)
    sc = task_kernel.TaskScalars.make(spec, ws)
    factors = [None if t is None else float(t) for t in scales]
    for out_dt in {dtype, torch.float32}:
        ref = torch.empty(total - start, dtype=out_dt, device=dev)
        mix_chunk(ref, srcs, b, spec, prep, TaskCoefficients.make(spec, ws, torch.float32, dev), start)
        got = torch.empty_like(ref)
        assert task_kernel.fused_task(got, srcs, b, spec, prep.masks, factors, sc, start)
        bad = (_bits(got) != _bits(ref)).sum().item()
        assert bad == 0, (names, out_dt, bad)


@needs_cuda
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_gpu_remixer_runs_every_tensor_through_the_fused_task_kernel(family, method, monkeypatch):
    """One kernel per averaged tensor (resident experts: the whole tensor at once), mix_chunk never; the same
    bits as with the kernel turned off (SOCE_FUSED_MIX=0, mix_chunk on every tensor)."""
    ws = {"a": 0.5, "b": 0.3, "c": 0.2}
    merge = {"method": method, **({"density": 0.5} if method == "ties" else {})}
    models = {n: family[n] for n in ws}
    calls = []
    real = task_kernel.fused_task
    monkeypatch.setattr(task_kernel, "fused_task", lambda *a, **kw: calls.append(a[0].numel()) or real(*a, **kw))
    got = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("SOCE_FUSED_MIX", flag)
        rmx = Remixer(models, device="cuda", merge=merge, base=family["base"])
        got[flag] = {k: v.cpu() for k, v in rmx.mix(ws).state_dict().items()}
        want = len(rmx.targets) if flag == "1" else 0
        assert len(calls) == want and sum(calls) == (sum(t.numel() for t in rmx.targets.values()) if want else 0)
        calls.clear()
    for k, v in got["0"].items():
        assert torch.equal(_bits(got["1"][k]), _bits(v)), k
