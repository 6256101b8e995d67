"""Nothing lost, nothing silent: outputs that alias inputs, concurrent publication, NaN/inf in soups, strict
safetensors headers, leftovers of killed writers, the model card's hub front matter."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from soce.merge import main
from soce.soup import Remixer, SoupError, read_header, write_soup

from .test_soup import load_dir, make_model

ROOT = Path(__file__).resolve().parents[1]


def _ckpt(d: Path, tensors: dict[str, torch.Tensor], cfg: dict | None = None) -> Path:
    d.mkdir(parents=True)
    save_file(tensors, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(cfg or {"model_type": "llama"}))
    return d


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (symlinks not followed) -> sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture()
def pool(tmp_path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    return {
        n: _ckpt(
            tmp_path / "models" / n,
            {"w": torch.randn(64, 32, generator=g).to(torch.bfloat16), "v": torch.randn(100, generator=g)},
        )
        for n in ("a", "b")
    }


# ------------------------------------------------------------------------------ 1. aliased outputs


ALIASES = [  # (output relative to tmp_path, what it aliases)
    ("work/../models/a", "a itself, through .."),
    ("work/../models/a/soup", "inside a, through .."),
    ("models/b/../a", "a itself, through .. via b"),
    ("link/a", "a itself, through a symlinked parent"),
    ("link/a/soup", "inside a, through a symlinked parent"),
    ("models/a/../..", "a folder that contains both inputs"),
    ("alias", "a symlink to a"),
    ("alias/sub/soup", "inside a, through a symlink"),
]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(("rel", "what"), ALIASES)
def test_aliased_output_is_refused_and_inputs_stay_byte_identical(pool, tmp_path, capsys, rel, what, overwrite):
    (tmp_path / "link").symlink_to(tmp_path / "models", target_is_directory=True)
    (tmp_path / "alias").symlink_to(pool["a"], target_is_directory=True)
    (tmp_path / "work").mkdir()
    before = _tree(tmp_path / "models")
    out = tmp_path / rel
    argv = [f"output={out}", f"models=[{pool['a']},{pool['b']}]", "weights=[0.5,0.5]", f"overwrite={overwrite}"]
    assert main(argv) == 2, what
    err = capsys.readouterr().err
    assert err.startswith("soce.merge: error:") and err.count("\n") == 1 and "overlaps candidate" in err, err
    assert _tree(tmp_path / "models") == before, what  # not one byte changed or added
    assert not list(tmp_path.rglob(".*soce-*"))  # and no temporary left anywhere


def test_aliased_output_from_the_command_line(pool, tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "models", target_is_directory=True)
    before = _tree(tmp_path / "models")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "soce.merge",
            f"output={tmp_path / 'link' / 'a'}",
            f"models=[{pool['a']},{pool['b']}]",
            "weights=[0.5,0.5]",
            "overwrite=true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "overlaps candidate 'a'" in r.stderr, r.stderr
    assert _tree(tmp_path / "models") == before


def test_output_beside_an_input_file_is_fine(tmp_path):
    """A bare .safetensors candidate: its folder may hold the soup (nothing of the input is touched)."""
    d = tmp_path / "files"
    d.mkdir()
    for n in ("x", "y"):
        save_file({"w": torch.full((4,), float(ord(n)))}, d / f"{n}.safetensors")
    out = write_soup({"x": d / "x.safetensors", "y": d / "y.safetensors"}, {"x": 1, "y": 1}, d / "soup")
    assert load_dir(out)["w"].tolist() == [120.5] * 4
    with pytest.raises(SoupError, match="overlaps"):
        write_soup({"x": d / "x.safetensors", "y": d / "y.safetensors"}, {"x": 1, "y": 1}, d, overwrite=True)


# ------------------------------------------------------------------------------ 2. concurrent publication

_RACER = """
import sys, time, pathlib, soce.soup.writer as w
me, other = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
orig, seen = w._write_all, []
def barrier(*a, **k):  # both merges have passed every start-up check before either publishes
    if not seen:
        seen.append(1); me.touch(); t = time.time()
        while not other.exists() and time.time() - t < 60: time.sleep(0.01)
    return orig(*a, **k)
w._write_all = barrier
from soce.merge import main
sys.exit(main(sys.argv[3:]))
"""


def _sha_shards(d: Path) -> dict[str, str]:
    """Tensor name -> sha256 of its bytes (the recipe in the metadata differs between CLI and API)."""
    return {
        k: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, t in load_dir(d).items()
    }


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_concurrent_merges_to_one_target(pool, tmp_path, overwrite):
    models = f"models=[{pool['a']},{pool['b']}]"
    ws = {"A": 0.9, "B": 0.2}
    expect = {k: _sha_shards(write_soup(pool, {"a": w, "b": 1 - w}, tmp_path / f"ref{k}")) for k, w in ws.items()}
    target = tmp_path / "out" / "soup"
    if overwrite:
        write_soup(pool, {"a": 1, "b": 1}, target)
    procs = {
        k: subprocess.Popen(
            [
                sys.executable,
                "-c",
                _RACER,
                str(tmp_path / k),
                str(tmp_path / ("BA"[i])),
                f"output={target}",
                models,
                f"weights=[{ws[k]!r},{1 - ws[k]!r}]",
                f"overwrite={overwrite}",
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i, k in enumerate(ws)
    }
    res = {k: (p.wait(timeout=120), p.stderr.read()) for k, p in procs.items()}
    for p in procs.values():
        p.stdout.close()
        p.stderr.close()
    won = [k for k, (rc, _) in res.items() if rc == 0]
    if overwrite:  # both replace; the target is one of the two soups, whole
        assert len(won) == 2, res
        assert _sha_shards(target) in expect.values()
    else:
        assert len(won) == 1, res  # exactly one succeeds ...
        (lost,) = set(ws) - set(won)
        rc, err = res[lost]
        assert rc == 2 and err.count("\n") == 1 and "output exists" in err, err  # ... the other says so in a line
        assert _sha_shards(target) == expect[won[0]]  # and the winner's soup is the one published
    assert sorted(p.name for p in target.parent.iterdir()) == ["soup"]


# ------------------------------------------------------------------------------ 3b. NaN / inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_is_refused_naming_tensor_and_file(tmp_path, bad, monkeypatch):
    import soce.soup.writer as writer

    monkeypatch.setattr(writer, "CHUNK_ELEMS", 1000)  # the bad element is deep in a later chunk
    x = torch.linspace(-1, 1, 5000)
    y = x.clone()
    y[3210] = bad
    a = _ckpt(tmp_path / "a", {"k": x, "z": x.to(torch.bfloat16)})
    b = _ckpt(tmp_path / "b", {"k": y, "z": x.to(torch.bfloat16)})
    out = tmp_path / "soup"
    with pytest.raises(SoupError) as e:
        write_soup({"a": a, "b": b}, {"a": 1, "b": 1}, out)
    msg = str(e.value)
    assert "\n" not in msg and str(b / "model.safetensors") in msg and "'k'" in msg and "element 3210" in msg, msg
    assert "allow_nonfinite" in msg and not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    got = load_dir(write_soup({"a": a, "b": b}, {"a": 1, "b": 1}, out, allow_nonfinite=True))
    assert not torch.isfinite(got["k"][3210]) and torch.isfinite(got["k"][:3210]).all()
    assert json.loads((out / "soce_recipe.json").read_text())["allow_nonfinite"] is True
    write_soup({"a": a, "b": b}, {"a": 1, "b": 0}, tmp_path / "w0")  # weight 0: b takes no part


def test_overflow_when_rounding_to_a_narrower_dtype(tmp_path):
    a = _ckpt(tmp_path / "a", {"k": torch.tensor([1.0, 1e5, 2.0])})
    b = _ckpt(tmp_path / "b", {"k": torch.tensor([1.0, 1e5, 2.0])})
    with pytest.raises(SoupError, match=r"'k': the soup overflows float16 at element 1"):
        write_soup({"a": a, "b": b}, {"a": 1, "b": 1}, tmp_path / "s", dtype="float16")
    assert load_dir(write_soup({"a": a, "b": b}, {"a": 1, "b": 1}, tmp_path / "s", dtype="bfloat16"))["k"][1] > 0


def test_nonfinite_from_the_command_line(tmp_path, capsys):
    a = _ckpt(tmp_path / "a", {"k": torch.ones(8)})
    b = _ckpt(tmp_path / "b", {"k": torch.tensor([1.0] * 7 + [float("nan")])})
    argv = [f"output={tmp_path / 's'}", f"models=[{a},{b}]", "weights=[0.5,0.5]"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds nan at element 7" in err and "'k'" in err
    assert main([*argv, "allow_nonfinite=true"]) == 0


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the device machine)"
            ),
        ),
    ],
)
def test_remixer_refuses_nonfinite(tmp_path, device):
    a = make_model(tmp_path / "a", 1)
    b = make_model(tmp_path / "b", 2)
    sd = load_dir(b)
    key = "model.layers.1.mlp.down_proj.weight"
    sd[key].view(-1)[77] = float("inf")
    save_file(sd, b / "model.safetensors", metadata={"format": "pt"})
    rmx = Remixer({"a": a, "b": b}, device=device)
    with pytest.raises(SoupError) as e:
        rmx.mix({"a": 0.5, "b": 0.5})
    msg = str(e.value)
    assert "\n" not in msg and str(b / "model.safetensors") in msg and repr(key) in msg and "element 77" in msg
    assert not torch.isfinite(rmx.mix({"a": 0.5, "b": 0.5}, allow_nonfinite=True).state_dict()[key]).all()
    assert torch.isfinite(rmx.mix({"a": 1.0}).state_dict()[key]).all()  # b not mixed: fine


# ------------------------------------------------------------------------------ 3c. strict headers


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(begin: int, end: int, n: int = 4) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("header", "size", "needle"),
    [
        ({"a": _f32(0, 16), "b": _f32(8, 24)}, 24, "'b': data overlaps tensor 'a'"),
        ({"a": _f32(0, 16), "b": _f32(0, 16)}, 16, "overlaps"),  # two names for the same bytes
        ({"a": _f32(8, 24)}, 24, "'a': 8 unused bytes at the start"),
        ({"a": _f32(0, 16), "b": _f32(24, 40)}, 40, "'b': 8 unused bytes after tensor 'a'"),
        ({"a": _f32(0, 16)}, 24, "8 bytes after the last tensor"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, 16, "must be integers"),
    ],
)
def test_header_layout_checked_as_strictly_as_safetensors(tmp_path, header, size, needle):
    f = _raw_file(tmp_path / "x.safetensors", header, bytes(size))
    with pytest.raises(SoupError, match=needle) as e:
        read_header(f)
    assert "\n" not in str(e.value) and str(f) in str(e.value)
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses the same file (its own error type)
        with safe_open(f, "pt") as g:
            [g.get_tensor(k) for k in g.keys()]


def test_header_duplicate_key_and_valid_layouts(tmp_path):
    f = tmp_path / "d.safetensors"
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(SoupError, match="key 'a' appears twice"):
        read_header(f)
    ok = _raw_file(
        tmp_path / "ok.safetensors", {"b": _f32(16, 32), "e": _f32(16, 16, 0), "a": _f32(0, 16)}, bytes(32)
    )  # out of order and an empty tensor: valid
    assert sorted(read_header(ok)[0]) == ["a", "b", "e"]
    with safe_open(ok, "pt") as g:
        assert sorted(g.keys()) == ["a", "b", "e"]


# ------------------------------------------------------------------------------ 5. leftovers


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_writers_are_cleaned_live_ones_kept(pool, tmp_path):
    parent = tmp_path / "out"
    parent.mkdir()
    host, dead = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8], _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = Path(f"/proc/{live.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        entries = {
            f".soup.soce-tmp-{host}-{dead}-123-aaaaaaaa": "removed",  # dead writer to this target
            f".soup.soce-tmp-{dead}-bbbbbbbb": "removed",  # older naming: pid only
            f".other.soce-tmp-{host}-{dead}-123-cccccccc": "removed",  # dead writer to another target
            f".kept.soce-old-{host}-{dead}-123-dddddddd": "removed",  # old copy whose target exists
            f".gone.soce-old-{host}-{dead}-123-eeeeeeee": "restored",  # old copy whose target is missing
            f".soup.soce-tmp-{host}-{live.pid}-{start}-ffffffff": "kept",  # a live writer
            f".soup.soce-tmp-{host}-{live.pid}-1-abababab": "removed",  # its pid, reused by another process
            f".soup.soce-tmp-0badc0de-{dead}-123-cdcdcdcd": "kept",  # another host: cannot tell
            ".soup.tmp-not-ours": "kept",
        }
        for name in entries:
            (parent / name).mkdir()
            (parent / name / "model.safetensors").write_text(name)
        (parent / "kept").mkdir()
        out = write_soup(pool, {"a": 1, "b": 1}, parent / "soup")
        left = sorted(p.name for p in parent.iterdir())
        assert left == sorted(["soup", "kept", "gone", *(n for n, what in entries.items() if what == "kept")])
        assert (parent / "gone" / "model.safetensors").read_text().startswith(".gone.soce-old-")
        assert out == parent / "soup"
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------ 6. model card


def test_model_card_front_matter(pool, tmp_path, capsys):
    cfg = json.loads((pool["a"] / "config.json").read_text())
    (pool["a"] / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "meta-llama/Llama-3.1-8B"}))
    out = write_soup(
        pool,
        {"a": 0.7, "b": 0.3},
        tmp_path / "s",
        recipe={"strategy": "soce_weighted", "split": "dev", "objective": "mean", "score": 0.6125},
    )
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == ["meta-llama/Llama-3.1-8B"]  # b has no hub id: its local path is no base_model ...
    assert f"`{pool['b']}`" in text  # ... it stays in the card's table (and the recipe)
    out = write_soup(pool, {"a": 0.7, "b": 0.3}, tmp_path / "h", recipe={"hub_ids": {"b": "org/b-model"}})
    card_front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert card_front["base_model"] == ["meta-llama/Llama-3.1-8B", "org/b-model"]  # the pool's hub id wins
    assert front["library_name"] == "transformers" and {"merge", "soce"} <= set(front["tags"])
    assert "# Model soup: soce_weighted, 2 ingredient(s)" in text
    assert "- split: dev" in text and "- objective: mean" in text and "- score: 0.6125" in text
    assert main([f"output={tmp_path / 'm'}", f"models=[{pool['a']},{pool['b']}]", "weights=[1,0]"]) == 0
    card = (tmp_path / "m" / "README.md").read_text()
    assert "((" not in card and "# Model soup: manual, 1 ingredient(s)" in card
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == ["meta-llama/Llama-3.1-8B"]  # weight 0: not one


def test_owner_tag_names_this_host_and_process():
    from soce import files

    tag = files.owner_tag()
    assert tag.split("-")[:2] == [files.host_id(), str(os.getpid())] and not files.owner_gone(tag)
    assert files.host_id() == hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
