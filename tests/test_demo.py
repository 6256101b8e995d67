"""The built-in demo: disjoint splits, deterministic cached builds, loadable checkpoints, offline lm-eval."""

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soce.config import DemoConfig
from soce.demo import tasks, zoo
from soce.demo.train import encode, quick_scores
from soce.demo.zoo import build_demo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("demo_a")
    return build_demo(DemoConfig(seed=0, preset="tiny", root=str(root)), progress=False)


def _data_hash(manifest: dict) -> str:
    h = hashlib.sha256()
    for path in sorted((Path(manifest["dir"]) / "data").glob("*.jsonl")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_splits_are_disjoint_and_training_never_sees_them():
    sizes = {"dev": 200, "test": 500}
    for cat in tasks.CATEGORIES:
        items = tasks.make_eval_items(0, cat.name, sizes)
        dev, test = {p for p, _ in items["dev"]}, {p for p, _ in items["test"]}
        assert len(dev) == 200 and len(test) == 500
        assert not dev & test, cat.name
        sampler = tasks.TrainSampler(0, cat.name, dev | test)
        assert not {sampler()[0] for _ in range(300)} & (dev | test)
    assert len(tasks.CATEGORIES) >= 6 and len(set(tasks.FAMILIES.values())) == 3


def test_items_are_correct_and_in_vocabulary():
    table = tasks.cipher_table(0)
    assert sorted(table) == sorted(table.values()) and all(k != v for k, v in table.items())
    items = {c.name: tasks.make_eval_items(0, c.name, {"dev": 20, "test": 20})["test"] for c in tasks.CATEGORIES}
    for prompt, target in items["half"]:
        assert int(target) == int(prompt[5:-1]) // 2
    for prompt, target in items["rev"]:
        assert target == prompt[4:-1][::-1]
    for prompt, target in items["dec"]:
        assert "".join(table[c] for c in target) == prompt[4:-1]
    for rows in items.values():
        for prompt, target in rows:
            encode(prompt + target)  # every character is in the vocabulary


def test_manifest(tiny):
    assert set(tiny) >= {
        "dir",
        "categories",
        "families",
        "splits",
        "task_dir",
        "task_template",
        "base",
        "candidates",
        "population",
    }
    assert tiny["categories"] == [c.name for c in tasks.CATEGORIES]
    assert set(tiny["families"]) == set(tiny["categories"]) and len(set(tiny["families"].values())) == 3
    assert set(tiny["outputs"]) == set(tiny["categories"])
    assert set(tiny["outputs"].values()) == {tasks.LOGLIKELIHOOD, tasks.GENERATE}  # both kinds of category
    assert tiny["splits"] == ["dev", "test"]
    assert len(tiny["candidates"]) >= 5 and len(tiny["population"]) >= 20
    assert not set(tiny["candidates"]) & set(tiny["population"])
    paths = [tiny["dir"], tiny["task_dir"], tiny["base"], *tiny["candidates"].values(), *tiny["population"].values()]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in paths)
    for cat in tiny["categories"]:
        for split in tiny["splits"]:
            name = tiny["task_template"].format(category=cat, split=split)
            assert (Path(tiny["task_dir"]) / f"{name}.yaml").exists()
    assert json.loads((Path(tiny["dir"]) / "manifest.json").read_text()) == tiny
    assert not list(Path(tiny["dir"]).parent.glob(".*tmp-*")), "staging folder left behind"


def test_cache_is_reused(tiny, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("rebuilt a cached zoo")

    monkeypatch.setattr(zoo, "_build_into", boom)
    root = str(Path(tiny["dir"]).parent)
    assert build_demo(DemoConfig(seed=0, preset="tiny", root=root), progress=False) == tiny


def test_build_is_deterministic(tiny, tmp_path):
    again = build_demo(DemoConfig(seed=0, preset="tiny", root=str(tmp_path)), progress=False)
    assert _data_hash(again) == _data_hash(tiny)
    for name in ["base", *tiny["candidates"]]:
        a = load_file(Path(tiny["candidates"].get(name, tiny["base"])) / "model.safetensors")
        b = load_file(Path(again["candidates"].get(name, again["base"])) / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    other = tasks.make_eval_items(1, "rev", {"dev": 40, "test": 60})
    assert other != tasks.make_eval_items(0, "rev", {"dev": 40, "test": 60})


def test_checkpoints_load_with_auto_classes(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in [tiny["base"], next(iter(tiny["candidates"].values())), next(iter(tiny["population"].values()))]:
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert next(model.parameters()).dtype == torch.float32
        text = "quad 12345=49380"
        assert tok.encode(text) == encode(text) and tok.decode(tok.encode(text)) == text


def test_lm_eval_offline_matches_quick_scores(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny["candidates"]["arith-pro"]
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    name = tiny["task_template"].format(category="half", split="dev")
    out = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=64),
        tasks=[name],
        task_manager=TaskManager(include_path=tiny["task_dir"], include_defaults=False),
        bootstrap_iters=0,
    )
    acc = out["results"][name]["acc,none"]
    assert 0.0 <= acc <= 1.0
    items = tasks.read_items(Path(tiny["dir"]) / "data" / "half_dev.jsonl")
    assert acc == pytest.approx(quick_scores(model, {"half": items})["half"])


def test_format_version_and_knobs_change_the_fingerprint(monkeypatch):
    cfg = DemoConfig(seed=0, preset="tiny")
    now = zoo._fingerprint(cfg)
    monkeypatch.setattr(zoo, "FORMAT_VERSION", zoo.FORMAT_VERSION - 1)
    assert zoo._fingerprint(cfg) != now  # a zoo of the previous format is rebuilt, not reused
    monkeypatch.undo()
    assert zoo._fingerprint(DemoConfig(seed=0, preset="fast")) != zoo._fingerprint(cfg)
    assert tasks.knobs(tasks.Knobs(num=(2, 3))) != tasks.knobs()


def test_knobs_set_item_sizes():
    small = tasks.Knobs(num=(2, 2), str=(3, 3), sort=(4, 4), cipher=(5, 5))
    items = {c.name: tasks.make_eval_items(0, c.name, {"dev": 10, "test": 10}, small)["dev"] for c in tasks.CATEGORIES}
    assert all(10 <= int(p.split()[1][:-1]) <= 99 for p, _ in items["quad"])
    assert {len(t) for _, t in items["rev"]} == {3} and {len(t) for _, t in items["sort"]} == {4}
    assert {len(t) for _, t in items["dec"]} == {5}


def test_build_restores_torch_threads(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before > 1 else 2)
    want = torch.get_num_threads()
    try:
        build_demo(DemoConfig(seed=3, preset="tiny", root=str(tmp_path)), progress=False)
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


def test_killed_build_is_cleaned_up_by_the_next(tmp_path):
    """SIGKILL mid-build (no clean-up handler runs) leaves a staging folder; the next build removes it."""
    code = (
        "from soce.config import DemoConfig; from soce.demo.zoo import build_demo; "
        f"build_demo(DemoConfig(seed=0, preset='tiny', root={str(tmp_path)!r}), progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, staged = time.time() + 300, []
    while time.time() < deadline and proc.poll() is None and not staged:
        time.sleep(0.2)
        staged = list(tmp_path.glob(".tiny-seed0.tmp-*/base/model.safetensors"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staged, "the build ended before it could be killed"
    assert list(tmp_path.glob(".tiny-seed0.tmp-*")) and not (tmp_path / "tiny-seed0").exists()
    manifest = build_demo(DemoConfig(seed=0, preset="tiny", root=str(tmp_path)), progress=False)
    assert not list(tmp_path.glob(".tiny-seed0.tmp-*")), "the killed build's staging folder is still there"
    assert Path(manifest["dir"]) == tmp_path / "tiny-seed0" and (tmp_path / "tiny-seed0" / "manifest.json").exists()
