"""The MLflow UI as a user opens it: a real `mlflow ui` on 127.0.0.1 over a real small sweep, driven by
Playwright in Debian's Chromium with a fresh profile (what a new user has). `make test` installs both (`make
browser`); CI sets SOCE_REQUIRE_BROWSER=1, so a missing browser fails there instead of skipping.

What it holds: the addresses `python -m soce.report url` prints open MLflow's training view (not its GenAI
screens) on exactly the sweep's job runs, one per distinct soup, with their names and columns; the sweep's
views are listed in the "Views" menu; the root page, after the one click on "Model training" the printed hint
asks for, and the experiment link reach the runs; the sweep report shows its figures."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from .conftest import soce_cmd
from .test_scale import free_port

CHROMIUM = os.environ.get("SOCE_CHROMIUM", "/usr/bin/chromium")
if not os.environ.get("SOCE_REQUIRE_BROWSER"):  # CI sets it: a missing browser fails there instead of skipping
    pytest.importorskip("playwright", reason="make browser")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (make browser)", allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]  # closed network: no background calls
WAIT_MS = 30_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_demo_root):
    """A strategy x tau sweep (uniform's soup does not depend on tau) on the fast demo, and its MLflow UI."""
    tmp = tmp_path_factory.mktemp("ui")
    p = subprocess.run(
        soce_cmd(
            "-m",
            "strategy=uniform,soce_weighted",
            "selection.tau=0.3,0.6",
            "debug=fast",
            "save_soup=false",
            f"paths.root_dir={tmp}",
            f"demo.root={tiny_demo_root}",
            f"hydra.sweep.dir={tmp / 'sweep'}",
        ),
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=1800,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [
            mlflow_bin,
            "ui",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'outputs' / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(base + "/health")
        yield tmp, base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _wait_for(url: str) -> None:
    for _ in range(240):
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer")


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which(CHROMIUM) or CHROMIUM, args=ARGS)
        yield b
        b.close()


def fresh_page(browser) -> Page:
    """A page in a new context: empty localStorage, as a new user's browser."""
    page = browser.new_context(viewport={"width": 1920, "height": 1080}).new_page()
    page.set_default_timeout(WAIT_MS)
    return page


def printed(tmp: Path, base: str) -> dict[str, str]:
    """The addresses `python -m soce.report url` prints: {what: address}."""
    p = subprocess.run(
        [sys.executable, "-m", "soce.report", "url", f"root={tmp}", f"base={base}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    out = {}
    for line in p.stdout.splitlines():
        what, sep, url = line.strip().rpartition(": ")
        if sep and url.startswith("http"):
            out[what] = url
    return out


def shown_jobs(tmp: Path) -> tuple[set[str], set[str]]:
    """(names of the job runs a view must show: one per distinct soup, names of all the sweep's job runs)."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'outputs' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["soce-demo"], filter_string="tags.`soce.kind` = 'job'")
    distinct = runs[runs["tags.soce.distinct"] == "true"]
    return set(distinct["tags.mlflow.runName"]), set(runs["tags.mlflow.runName"])


def assert_training_view(page: Page) -> None:
    """MLflow's training screens (sidebar: Runs, Models, Model registry), not its GenAI ones (Observability,
    Traces, Sessions, Evaluation; a traces dashboard with token usage and cost)."""
    page.wait_for_function("document.body.innerText.includes('Model registry')", timeout=WAIT_MS)
    body = page.inner_text("body")
    assert "Observability" not in body and "Token Usage" not in body and "Cost Breakdown" not in body, body[:500]


def expand_sweep(page: Page) -> None:
    """Open the sweep's parent run in the runs table (its job runs are nested under it)."""
    cell = page.locator('[role="gridcell"][col-id="attributes.`Run Name`"]').filter(has_text="sweep ")
    cell.first.wait_for()
    cell.first.locator("button").first.click()


def test_printed_jobs_view_shows_exactly_the_distinct_job_runs(sweep, browser):
    tmp, base = sweep
    urls = printed(tmp, base)
    jobs_url = next(u for w, u in urls.items() if w.startswith("jobs of sweep"))
    want, every = shown_jobs(tmp)
    assert want == {"uniform tau=0.3,0.6", "soce_weighted tau=0.3", "soce_weighted tau=0.6"} or want == {
        "uniform tau=0.3,0.6",
        "soce_weighted tau=0.3,0.6",
    }, want  # uniform once, for both taus
    page = fresh_page(browser)
    page.goto(jobs_url)
    page.get_by_text(f"{len(want)} matching runs").wait_for()
    assert_training_view(page)
    for name in want:
        page.get_by_role("link", name=name, exact=True).wait_for()
    for name in every - want:
        assert page.get_by_role("link", name=name, exact=True).count() == 0, name
    headers = page.get_by_role("columnheader").all_inner_texts()
    for col in ("test.overall", "dev.overall", "strategy", "tau", "experts"):  # swept params, overall scores
        assert col in headers, (col, headers)
    assert not [h for h in headers if h.startswith("test.") and h != "test.overall"], headers  # categories: report
    assert "Sort: test.overall" in page.inner_text("body")


def test_views_menu_lists_the_sweeps_views(sweep, browser):
    tmp, base = sweep
    urls = printed(tmp, base)
    page = fresh_page(browser)
    page.goto(next(u for w, u in urls.items() if w.startswith("jobs of sweep")))
    page.get_by_test_id("saved-views-trigger").click()
    menu = page.get_by_role("menu").inner_text()
    assert "No saved views yet" not in menu
    assert "jobs, best first" in menu and "weight search points" in menu, menu
    points = [u for w, u in urls.items() if w.startswith("search points of")]
    assert points, urls
    page.goto(points[0])
    page.get_by_text("matching runs").first.wait_for()
    assert_training_view(page)


def test_experiment_address_and_root_reach_the_job_runs(sweep, browser):
    tmp, base = sweep
    urls = printed(tmp, base)
    want, _ = shown_jobs(tmp)
    page = fresh_page(browser)
    page.goto(next(u for w, u in urls.items() if w.startswith("experiment soce-demo")))
    page.get_by_text("matching runs").first.wait_for()
    assert_training_view(page)
    expand_sweep(page)
    for name in want:
        page.get_by_role("link", name=name, exact=True).wait_for()
    # the root page, as the printed hint says: one click on 'Model training', then the experiment link
    page = fresh_page(browser)
    page.goto(base + "/")
    page.get_by_text("Model training", exact=True).first.click()
    page.get_by_role("link", name="soce-demo").first.click()
    page.get_by_text("matching runs").first.wait_for()
    assert "/runs" in page.url and "workflowType=machine_learning" in page.url, page.url
    assert_training_view(page)
    expand_sweep(page)
    for name in want:
        page.get_by_role("link", name=name, exact=True).wait_for()


def test_sweep_report_shows_its_figures(sweep, browser):
    tmp, base = sweep
    md = (tmp / "sweep" / "report.md").read_text()
    figures = ["scores.png", "weights.png", "correlation.png"]
    assert all(re.search(rf"^!\[[^\]]+\]\({re.escape(f)}\)$", md, re.M) for f in figures), md  # image syntax
    parent = json.loads((tmp / "sweep" / "mlflow_parent.json").read_text())
    page = fresh_page(browser)
    page.goto(
        f"{base}/#/experiments/{parent['experiment_id']}/runs/{parent['run_id']}/artifacts/report.html"
        "?workflowType=machine_learning"
    )
    frame = None
    for _ in range(60):
        frame = next((f for f in page.frames if f != page.main_frame and f.url.startswith("blob:")), None)
        if frame is not None and frame.locator("img").count() >= len(figures):
            break
        page.wait_for_timeout(500)
    assert frame is not None, [f.url for f in page.frames]
    shown = frame.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
    assert sorted(a for a, ok in shown if ok) == sorted(["scores by job", "soup weights", "category correlation"]), (
        shown
    )
