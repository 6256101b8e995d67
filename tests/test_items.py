"""The item-level cache: only missing items are computed, counters in items, resumable after kill -9."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from soce.search.items import ItemCache


def scorer(calls):
    def compute(missing):
        calls.append({c: list(v) for c, v in missing.items()})
        return {c: {i: float(int(i) % 2) for i in ids} for c, ids in missing.items()}

    return compute


def test_computes_only_missing_items_and_counts_them(tmp_path):
    cache, calls = ItemCache(tmp_path), []
    out = cache.get_or_compute("k1", {"a": ["1", "2"], "b": ["3"]}, scorer(calls))
    assert out == {"a": {"1": 1.0, "2": 0.0}, "b": {"3": 1.0}}
    assert (cache.items_evaluated, cache.items_cached) == (3, 0)
    out = cache.get_or_compute("k1", {"a": ["1", "2", "4"], "b": ["3", "5"]}, scorer(calls))
    assert calls[-1] == {"a": ["4"], "b": ["5"]}  # growing the subset evaluates only the new items
    assert out == {"a": {"1": 1.0, "2": 0.0, "4": 0.0}, "b": {"3": 1.0, "5": 1.0}}
    assert (cache.items_evaluated, cache.items_cached) == (5, 3)


def test_nothing_missing_skips_compute_and_keys_are_separate(tmp_path):
    cache, calls = ItemCache(tmp_path), []
    cache.get_or_compute("k1", {"a": ["1"]}, scorer(calls))
    cache.get_or_compute("k1", {"a": ["1"]}, scorer(calls))
    assert len(calls) == 1
    cache.get_or_compute("k2", {"a": ["1"]}, scorer(calls))  # another soup: computed
    assert len(calls) == 2


def test_a_new_cache_object_reads_what_another_wrote(tmp_path):
    ItemCache(tmp_path).get_or_compute("k", {"a": ["1", "2"]}, scorer([]))
    fresh, calls = ItemCache(tmp_path), []
    assert fresh.get_or_compute("k", {"a": ["2", "1"]}, scorer(calls)) == {"a": {"2": 0.0, "1": 1.0}}
    assert calls == [] and fresh.items_cached == 2 and fresh.items_evaluated == 0


def test_torn_last_line_is_skipped_and_the_file_stays_appendable(tmp_path):
    cache = ItemCache(tmp_path)
    cache.get_or_compute("k", {"a": ["1"]}, scorer([]))
    with open(cache.path("k"), "ab") as fh:  # what a writer killed mid-line leaves behind
        fh.write(b'{"scores": {"a": {"2": 1')
    again, calls = ItemCache(tmp_path), []
    out = again.get_or_compute("k", {"a": ["1", "2"]}, scorer(calls))
    assert calls == [{"a": ["2"]}] and out == {"a": {"1": 1.0, "2": 0.0}}
    lines = cache.path("k").read_text().splitlines()
    assert json.loads(lines[-1]) == {"scores": {"a": {"2": 0.0}}}
    assert ItemCache(tmp_path).load("k") == {"a": {"1": 1.0, "2": 0.0}}


def test_compute_that_omits_an_item_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no score for item '2' of category 'a'"):
        ItemCache(tmp_path).get_or_compute("k", {"a": ["1", "2"]}, lambda m: {"a": {"1": 1.0}})
    with pytest.raises(ValueError, match="not a plain file name"):
        ItemCache(tmp_path).path("../x")


def test_resumes_after_kill_9(tmp_path):
    """A process killed (SIGKILL) after two of four batches: a rerun computes only the two batches it lacks."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from soce.search.items import ItemCache
        cache, n = ItemCache(Path({str(tmp_path)!r})), 0
        def compute(missing):
            global n
            n += 1
            if n == 3 and sys.argv[1] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return {{c: {{i: 1.0 for i in ids}} for c, ids in missing.items()}}
        for b in range(4):
            cache.get_or_compute("k", {{"a": [str(i) for i in range(10 * (b + 1))]}}, compute)
        print(cache.items_evaluated, cache.items_cached)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    killed = subprocess.run([sys.executable, "-c", script, "kill"], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    rerun = subprocess.run([sys.executable, "-c", script, "go"], env=env, capture_output=True, text=True, check=True)
    assert rerun.stdout.split() == ["20", "80"]  # items 20-39 computed anew; the rest (10+20+20+30) cached
