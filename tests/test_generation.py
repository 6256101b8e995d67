"""The demo's generation categories: lm-eval generate_until tasks, scored the same in memory and by lm-eval's CLI.

soce scores live models in memory (lm-eval's HFLM over a model object, batched: prompts of different lengths
are left-padded in one batch); ``lm_eval --model hf`` loads a saved checkpoint and generates one prompt at a
time (batch size 1, no padding). The same soup must get the same generations, item by item.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from soce.benchmarks.lmeval import Evaluator, engine_lm, load_model, quiet_lm_eval
from soce.config import BenchmarkConfig
from soce.demo import tasks

ROOT = Path(__file__).resolve().parents[1]
SPLIT = "dev"


@pytest.fixture(scope="module")
def manifest(tiny_demo_root) -> dict:
    return json.loads(next(Path(tiny_demo_root).glob("fast-seed0/manifest.json")).read_text())


@pytest.fixture(scope="module")
def gen_categories(manifest) -> list[str]:
    cats = [c for c, out in manifest["outputs"].items() if out == tasks.GENERATE]
    assert 2 <= len(cats) < len(manifest["categories"]), "the demo mixes loglikelihood and generation categories"
    return cats


@pytest.fixture(scope="module")
def soup(manifest, tmp_path_factory) -> Path:
    from soce.soup.writer import write_soup

    names = ["arith-pro", "string-pro", "cipher-pro"]
    out = tmp_path_factory.mktemp("gen") / "soup"
    weights = dict(zip(names, [0.5, 0.3, 0.2], strict=True))
    return write_soup({n: manifest["candidates"][n] for n in names}, weights, out)


def test_task_yaml_generation_settings(manifest, gen_categories):
    for c in manifest["categories"]:
        text = (Path(manifest["task_dir"]) / f"soce_demo_{c}_{SPLIT}.yaml").read_text()
        cfg = yaml.load(text, Loader=yaml.BaseLoader)  # BaseLoader: reads the !function tag as plain text
        if c not in gen_categories:
            assert cfg["output_type"] == "loglikelihood" and "generation_kwargs" not in cfg
            continue
        gen = cfg["generation_kwargs"]
        assert cfg["output_type"] == "generate_until" and gen["until"] == list(tasks.GEN_UNTIL)
        assert gen["do_sample"] == "false"
        longest = max(
            len(t)
            for s in manifest["splits"]
            for _, t in tasks.read_items(Path(manifest["dir"]) / "data" / f"{c}_{s}.jsonl")
        )
        assert int(gen["max_gen_toks"]) == longest + tasks.GEN_SLACK
        assert cfg["process_results"] == "soce.demo.tasks.process_results"


def test_process_results_is_exact_match_of_the_stripped_generation():
    doc = {"prompt": "tri 12=", "target": "36"}
    assert tasks.process_results(doc, ["36"]) == {"acc": 1.0}
    assert tasks.process_results(doc, [" 36\n"]) == {"acc": 1.0}
    assert tasks.process_results(doc, ["366"]) == {"acc": 0.0}
    assert tasks.process_results(doc, ["3"]) == {"acc": 0.0}
    assert tasks.process_results(doc, [""]) == {"acc": 0.0}


def _cli_samples(soup: Path, names: list[str], task_dir: str, out: Path) -> dict[str, dict[int, dict]]:
    cmd = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={soup}",
        "--tasks",
        ",".join(names),
        "--include_path",
        task_dir,
        "--log_samples",
        "--output_path",
        str(out),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    samples = {}
    for name in names:
        (path,) = out.rglob(f"samples_{name}_*.jsonl")
        samples[name] = {r["doc_id"]: r for r in map(json.loads, path.read_text().splitlines())}
    return samples


@pytest.mark.slow
def test_batched_in_memory_generation_matches_lm_eval_cli(manifest, gen_categories, soup, tmp_path):
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    quiet_lm_eval()
    batch = yaml.safe_load((ROOT / "conf" / "benchmark" / "demo.yaml").read_text())["batch_size"]
    names = [manifest["task_template"].format(category=c, split=SPLIT) for c in gen_categories]
    model, tok = load_model(str(soup))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch)
    mem = simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=TaskManager(include_path=manifest["task_dir"], include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    assert tok.padding_side == "right", "HFLM restores the tokenizer's padding side after left-padding a batch"
    cli = _cli_samples(soup, names, manifest["task_dir"], tmp_path / "cli")

    bench = BenchmarkConfig(
        name="demo",
        categories=gen_categories,
        task=manifest["task_template"],
        task_dir=manifest["task_dir"],
        batch_size=batch,
    )
    soce_scores = Evaluator(bench).score(model, tok, SPLIT)  # the path a search point takes
    correct = 0
    for c, name in zip(gen_categories, names, strict=True):
        rows = sorted(mem["samples"][name], key=lambda r: r["doc_id"])
        assert len(rows) == len(cli[name]) == manifest["sizes"][SPLIT] <= batch  # one padded batch per task
        lengths = {len(r["doc"]["prompt"]) for r in rows}
        assert len(lengths) > 1, "prompts of one length: the batch would need no padding"
        for r in rows:
            other = cli[name][r["doc_id"]]
            assert r["filtered_resps"] == other["filtered_resps"], (name, r["doc"], other["filtered_resps"])
            assert r["acc"] == other["acc"]
        assert soce_scores["samples"][c] == [r["acc"] for r in rows]
        correct += sum(r["acc"] for r in rows)
    total = len(gen_categories) * manifest["sizes"][SPLIT]
    assert 0 < correct < total, "all right or all wrong: the comparison would show nothing"


def test_engine_generate_until_matches_hf_generate(manifest, gen_categories, soup):
    """lm-eval's generate_until on soce's generation engine (one continuous batch per task, stop strings, eos)
    gives HF generate's responses, item by item, and the soce Evaluator uses it."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    quiet_lm_eval()
    names = [manifest["task_template"].format(category=c, split=SPLIT) for c in gen_categories]
    model, tok = load_model(str(soup))
    runs, engines = {}, {}
    for kind, lm in (
        ("hf", HFLM(pretrained=model, tokenizer=tok, batch_size=4)),
        ("engine", engine_lm(model, tok, 4, engines)),
    ):
        manager = TaskManager(include_path=manifest["task_dir"], include_defaults=False)
        runs[kind] = simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0, log_samples=True)
    assert len(engines) == 1, "the engine ran the generation"
    for name in names:
        hf = sorted(runs["hf"]["samples"][name], key=lambda r: r["doc_id"])
        eng = sorted(runs["engine"]["samples"][name], key=lambda r: r["doc_id"])
        assert [r["filtered_resps"] for r in eng] == [r["filtered_resps"] for r in hf]
        assert [r["acc"] for r in eng] == [r["acc"] for r in hf]
