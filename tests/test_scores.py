"""Numbers that must not be silently wrong: score CSV scales and non-finite cells, cache entries checked
against the evaluation schema, fingerprints of large checkpoints that see every byte."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from soce.benchmarks import scores
from soce.benchmarks.scores import ScoreCache, model_fingerprint, read_score_csv
from soce.config import ConfigError
from soce.soup import read_header

# ------------------------------------------------------------------------------ 3a. score CSVs


def _csv(tmp_path, text: str):
    f = tmp_path / "s.csv"
    f.write_text(text)
    return f


def test_one_unit_per_table(tmp_path):
    t, _ = read_score_csv(_csv(tmp_path, "model,a,b,c\nm1,45,80,50%\nm2,0.5,30,0.5%\nm3,0,0,0\n"))
    assert t["a"].tolist() == pytest.approx([0.45, 0.005, 0.0])  # a percent table: 0.5 is a low score (0.5%) ...
    assert t["b"].tolist() == pytest.approx([0.8, 0.3, 0.0])
    assert t["c"].tolist() == pytest.approx([0.5, 0.005, 0.0])  # ... and '%' marks percent, even below 1
    t, _ = read_score_csv(_csv(tmp_path, "model,a,b\nm1,0.8,1\nm2,0.2,0.5\n"))
    assert t["a"].tolist() == pytest.approx([0.8, 0.2])  # every cell <= 1: fractions


def leaderboard(n: int = 24) -> str:
    """The shape of the public BFCL v3 leaderboard: percent columns; weak models score 0.0 and 0.5 on multi-turn."""
    import random

    rng = random.Random(0)
    cats = ["simple", "multiple", "live_simple", "irrelevance", "multi_turn_base", "multi_turn_long_context"]
    rows = ["model," + ",".join(cats)]
    for i in range(n):
        skill = (i + 1) / n
        cells = [f"{rng.uniform(40, 95) * (0.5 + skill / 2):.2f}" for _ in cats[:4]]
        weak = i < n // 3
        cells += [rng.choice(["0.0", "0.5"]) if weak else f"{rng.uniform(2, 60) * skill:.2f}" for _ in cats[4:]]
        rows.append(f"Model-{i} (Prompt)," + ",".join(cells))
    return "\n".join(rows) + "\n"


def test_a_real_leaderboard_shape_is_read_in_percent(tmp_path):
    t, _ = read_score_csv(_csv(tmp_path, leaderboard()))
    assert t.loc["Model-0 (Prompt)", "multi_turn_base"] in (0.0, 0.005)  # 0.5 is half a percent, not 50%
    assert float(t.max().max()) <= 0.95 and float(t["multi_turn_base"].max()) > 0.01


@pytest.mark.parametrize(
    ("text", "needle"),
    [  # a percent table whose column is all <= 1: refused, naming it
        (
            "model,a,b,c\nm1,0.3,0.5,55\nm2,0.7,0.4,70\nm3,0.5,0.6,60\n",
            r"column 'a' holds only values <= 1 \(0.3 to 0.7\)",
        ),
        ("model,a,b\nm1,0.5,80\nm2,0.0,40\nm3,0.5,30\n", r"column 'a' .* \(model 'm1' has 80 in 'b'\)"),
    ],
)
def test_a_column_in_another_unit_is_refused(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        read_score_csv(_csv(tmp_path, text))
    assert "\n" not in str(e.value) and "pool.scale=percent" in str(e.value)


def test_a_stated_unit_wins(tmp_path):
    f = _csv(tmp_path, "model,a,b\nm1,0.5,80\nm2,0.0,40\nm3,0.5,30\n")
    t, _ = read_score_csv(f, scale="percent")
    assert t["a"].tolist() == pytest.approx([0.005, 0.0, 0.005])
    with pytest.raises(ConfigError, match="pool.scale=fraction but model 'm1' has 80 in 'b'"):
        read_score_csv(f, scale="fraction")
    t, _ = read_score_csv(_csv(tmp_path, "model,a\nm1,0.5\nm2,1\n"), scale="percent")
    assert t["a"].tolist() == pytest.approx([0.005, 0.01])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model,a,b\nm1,0.1,nan\nm2,0.2,0.3\n", "non-finite score 'nan' for model 'm1', category 'b'"),
        ("model,a,b\nm1,0.1,0.2\nm2,NaN,0.3\n", "non-finite score 'NaN' for model 'm2', category 'a'"),
        ("model,a,b\nm1,0.1,inf\nm2,0.2,0.3\n", "non-finite score 'inf' for model 'm1', category 'b'"),
        ("model,a,b\nm1,0.1,-Infinity\nm2,0.2,0.3\n", "non-finite score '-Infinity'"),
        ("model,a,b\nm1,0.1,-0.2\nm2,0.2,0.3\n", "score '-0.2' for model 'm1', category 'b' is out of range"),
        ("model,a,b\nm1,0.1,150\nm2,0.2,0.3\n", "score '150' for model 'm1', category 'b' is out of range"),
        ("model,a,b\nm1,0.1,0_5\nm2,0.2,0.3\n", "non-numeric score '0_5' for model 'm1', category 'b'"),
        ("model,a,b\nm1,0.1,1e400\nm2,0.2,0.3\n", "non-finite score '1e400'"),
    ],
)
def test_bad_scales_and_cells_one_line(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        read_score_csv(_csv(tmp_path, text))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ 3d. cache entries

CATS = ["x", "y"]
GOOD = {"x": 0.5, "y": 1.0, "overall": 0.75, "samples": {"x": [0.0, 1.0], "y": [1.0]}}


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"x": 7.0, "y": 0.5, "overall": 3.75}, "'x' = 7.0"),  # a score of 7.0
        ({"x": 0.5, "overall": 0.5}, "no score for 'y'"),  # a category missing
        ([0.5, 0.5], "a list"),  # a list
        ({"x": 0.5, "y": 0.5}, "no score for 'overall'"),
        ({"x": 0.5, "y": float("nan"), "overall": 0.5}, "'y' = nan"),
        ({"x": 0.5, "y": True, "overall": 0.5}, "'y' = True"),
        ({"x": 0.5, "y": "0.5", "overall": 0.5}, "'y' = '0.5'"),
        ({"x": 0.5, "y": 0.5, "overall": "high"}, "overall"),
        ({**GOOD, "samples": [1, 0]}, "samples is not a dict of lists"),
        ({**GOOD, "samples": {"x": [0.5, None]}}, "samples holds"),
        ({**GOOD, "overall": 0.99}, "overall = 0.99 is not its categories' mean (0.75)"),  # only overall wrong
        ({**GOOD, "overall_mean": 0.6}, "overall_mean = 0.6 is not its categories' mean"),
    ],
)
def test_invalid_cache_entries_are_recomputed_with_a_warning(tmp_path, caplog, entry, why):
    c = ScoreCache(tmp_path)
    key = "ab" + "c" * 30
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / f"{key}.json").write_text(json.dumps(entry))
    calls = []
    with caplog.at_level(logging.WARNING, logger="soce.scores"):
        got = c.get_or_compute(key, lambda: calls.append(1) or dict(GOOD), categories=CATS)
    assert got == GOOD and calls == [1] and (c.cached, c.evaluated, c.rejected) == (0, 1, 1)
    assert why in caplog.text and "evaluating again" in caplog.text
    assert ScoreCache(tmp_path).get_or_compute(key, lambda: 1 / 0, categories=CATS) == GOOD  # fixed on disk


def test_valid_entries_served_and_invalid_computations_refused(tmp_path):
    c = ScoreCache(tmp_path)
    assert c.get_or_compute("k" * 32, lambda: dict(GOOD), categories=CATS) == GOOD
    assert c.get_or_compute("k" * 32, lambda: 1 / 0, categories=CATS) == GOOD and c.cached == 1
    assert scores.entry_problem({"x": 0.5}) is None  # no categories given: ranges and types only
    with pytest.raises(ValueError, match="invalid .*'x' = 1.5"):
        c.get_or_compute("q" * 32, lambda: {"x": 1.5, "y": 0.5, "overall": 1.0}, categories=CATS)
    assert not (tmp_path / "qq").exists()
    official = {**GOOD, "overall": 0.7, "overall_official": 0.7, "overall_mean": 0.75}  # bfcl objective=official
    assert scores.entry_problem(official, CATS) is None


# ------------------------------------------------------------------------------ 4. fingerprints at real sizes


def test_large_checkpoint_fingerprint_sees_a_tensor_replaced_in_place(tmp_path):
    """260 MiB of weights (over the 256 MiB whole-read limit): a tensor rewritten in place, same size and even
    the same mtime, changes the fingerprint; an unchanged file is read once (memoised on disk)."""
    d, memo = tmp_path / "big", tmp_path / "cache" / "fingerprints"
    d.mkdir()
    f = d / "model.safetensors"
    save_file({"a": torch.zeros(25 << 20), "b": torch.ones(1 << 20), "c": torch.zeros(39 << 20)}, f)
    (d / "config.json").write_text("{}")
    size = f.stat().st_size
    b = read_header(f)[0]["b"]
    samples = [(0, 1 << 20), (size // 2, size // 2 + (1 << 20)), (size - (1 << 20), size)]  # the old sampling
    assert size > 256 << 20 and all(b.end <= lo or b.begin >= hi for lo, hi in samples)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 5 * 10**9))  # settled (not "just written")
    time.sleep(1.1)  # and its ctime too
    hashed, hits = scores.HASH_STATS.hashed_bytes, scores.HASH_STATS.memo_hits
    fp1 = model_fingerprint(d, memo_dir=memo)
    assert scores.HASH_STATS.hashed_bytes - hashed >= size and list(memo.iterdir())
    hashed = scores.HASH_STATS.hashed_bytes
    assert model_fingerprint(d, memo_dir=memo) == fp1
    assert scores.HASH_STATS.hashed_bytes - hashed < 1 << 20  # no file read again ...
    assert scores.HASH_STATS.memo_hits == hits + 2  # ... both digests from the memo
    st = f.stat()
    with open(f, "r+b") as fh:  # replace tensor b in place
        fh.seek(b.begin)
        fh.write(torch.full((1 << 20,), 2.0).numpy().tobytes())
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    assert f.stat().st_size == size and f.stat().st_mtime_ns == st.st_mtime_ns
    fp2 = model_fingerprint(d, memo_dir=memo)
    assert fp2 != fp1
    assert model_fingerprint(d) == fp2  # the memo never changes the value


def test_small_checkpoint_fingerprint_unchanged_and_files(tmp_path):
    """Below 256 MiB the formula is the original one (existing cache keys stay valid); a bare file works."""
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    h = hashlib.sha256()
    h.update(b"model.safetensors")
    h.update(b"3")
    h.update(b"abc")
    assert model_fingerprint(tmp_path) == h.hexdigest()[:20]
    assert model_fingerprint(tmp_path / "model.safetensors") == h.hexdigest()[:20]


# ------------------------------------------------------------------------------ 5. leftovers of JSON writers


def test_json_temp_files_of_dead_writers_are_removed(tmp_path):
    """A writer killed between creating its ``.{name}.{owner}.tmp`` and the rename leaves it behind; the next
    write to that file removes it (owner dead), and leaves a live writer's alone."""
    import subprocess
    import sys

    from soce import files
    from soce.files import write_json_atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = files.host_id()
    stale = tmp_path / f".r.json.{host}-{dead.pid}-1-aaaaaaaa.tmp"
    live = tmp_path / f".r.json.{host}-{os.getpid()}-{files.start_time(os.getpid())}-bbbbbbbb.tmp"
    other = tmp_path / f".q.json.{host}-{dead.pid}-1-cccccccc.tmp"  # another file's: left for its own writer
    for f in (stale, live, other):
        f.write_text("{")
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", live.name, other.name])
