"""The MLflow UI of the team server, in a real browser: Debian's chromium, driven by Playwright.

It logs in (HTTP basic auth; the same page without credentials gets 401), checks that an
experiment opens on its training runs (not MLflow 3's GenAI traces view) and that the run is
"Created by" the logged-in user, then opens the experiment, the training run (parameters, a metric chart, the confusion-matrix artifact, the
logged model) and the registered model with its versions and aliases. Every page is
screenshotted under ``test-output/ui/``; the test fails if any of these is missing.
Playwright's own browser download is never used (``executable_path=/usr/bin/chromium``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.server.conftest import DATASET_BUCKET, OUTPUT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic", "--disable-dev-shm-usage"]
TIMEOUT_MS = 90_000  # the SPA's first load on a busy 2-core machine


@pytest.fixture
def shots() -> Path:
    out = OUTPUT / "ui"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing: apt-get install chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _open(page, url: str, shown: str):
    """Go to ``url`` and wait until ``shown`` is on the page; close the assistant side panel.

    The SPA polls (auto-refresh), so "network idle" never comes: each step below waits for the
    very elements it checks (and so screenshots) instead.
    """
    page.goto(url)
    page.get_by_text(shown, exact=True).first.wait_for(timeout=TIMEOUT_MS)
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def _logged_model_id(stack, experiment_id: str, run_id: str) -> str:
    import requests

    resp = requests.post(f"{stack.cfg.tracking_uri}/api/2.0/mlflow/logged-models/search",
                         json={"experiment_ids": [experiment_id], "max_results": 10,
                               "filter": f"source_run_id = '{run_id}'"},
                         auth=(stack.secrets.admin_username, stack.secrets.admin_password),
                         timeout=30)
    resp.raise_for_status()
    models = {m["info"]["name"]: m["info"]["model_id"] for m in resp.json()["models"]}
    assert "model" in models, f"the run logged no model named 'model': {models}"
    return models["model"]


def test_ui_shows_experiment_run_artifacts_and_registered_model(stack, trained, browser, shots):
    base = stack.cfg.tracking_uri
    exp, run_id, model = trained["experiment_id"], trained["run_id"], trained["model_name"]

    # Without (or with wrong) credentials the browser gets nothing but a 401, which headless
    # Chromium reports as a failed navigation (there is no login dialog to show).
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    for creds in (None, {"username": stack.secrets.admin_username, "password": "wrong"}):
        anon = browser.new_context(http_credentials=creds)
        try:
            status = anon.new_page().goto(base + "/").status
        except PlaywrightError as exc:
            assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc), exc
            status = 401
        assert status == 401, creds
        anon.close()

    ctx = browser.new_context(
        http_credentials={"username": stack.secrets.admin_username,
                          "password": stack.secrets.admin_password},
        viewport={"width": 1440, "height": 1000})
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    try:
        # A first visit (empty localStorage) to the bare experiment URL, as from the list:
        # the training-runs view, not GenAI's traces; no assistant panel popping up.
        page.goto(f"{base}/#/experiments/{exp}")
        run_name = _run_name(stack, run_id)
        page.get_by_role("link", name=run_name).first.wait_for()
        expect(page).to_have_url(re.compile(rf"/experiments/{exp}/runs\b"), timeout=TIMEOUT_MS)
        expect(page).to_have_url(re.compile("workflowType=machine_learning"), timeout=TIMEOUT_MS)
        page.get_by_text("Model training", exact=True).first.wait_for()  # the workflow switch
        page.get_by_text("matching run", exact=False).first.wait_for()  # the run table's footer
        page.screenshot(path=shots / "0-experiment-default-view.png")
        # The page is complete (its run table is filled in): no assistant panel opened on it.
        assert not page.get_by_placeholder("Ask a question").first.is_visible()  # assistant
        assert not page.get_by_text("Detect Issues").first.is_visible()

        # Logged in: the account menu names the user.
        _open(page, f"{base}/#/experiments/{exp}/runs", run_name)
        page.get_by_role("button", name=f"Account menu for {stack.secrets.admin_username}"
                         ).wait_for()
        page.get_by_text(run_name).first.wait_for()
        page.screenshot(path=shots / "1-experiment-runs.png")

        # The run: parameters.
        _open(page, f"{base}/#/experiments/{exp}/runs/{run_id}", run_name)
        params = page.get_by_text("Parameters (", exact=False).first
        params.evaluate("e => e.scrollIntoView({block: 'start'})")
        for name in ("learning_rate", "num_epochs", "arch"):
            page.get_by_text(name, exact=True).first.wait_for()
        page.get_by_text("resnet18", exact=True).first.wait_for()
        page.get_by_text(f"s3://{DATASET_BUCKET}/imgs", exact=True).first.wait_for()
        # "Created by": the logged-in user who ran `mlflow run`, not the OS user (root).
        about = page.get_by_text("Created by", exact=True).first.locator("xpath=../..")
        expect(about).to_contain_text(f"Created by {stack.secrets.admin_username}",
                                      use_inner_text=True, timeout=TIMEOUT_MS)
        # ...and, below them, the run's logged models ("model" and the ONNX export).
        page.get_by_text("Logged models (", exact=False).first.wait_for()
        page.get_by_role("link", name="model", exact=True).first.wait_for()
        page.screenshot(path=shots / "2-run-parameters.png")

        # A metric chart: the per-step training loss, drawn (an SVG plot with a line).
        _open(page, f"{base}/#/experiments/{exp}/runs/{run_id}/model-metrics", "Model metrics")
        # Charts render lazily as they scroll into view: filter down to the one we want.
        page.get_by_placeholder("Search metric charts").fill("train_loss_step")
        title = page.get_by_text("train_loss_step", exact=True).first
        title.wait_for()
        title.scroll_into_view_if_needed()
        # The chart card that holds this title, and the line plotted in it.
        card = title.locator("xpath=ancestor::div[.//*[contains(@class, 'js-plotly-plot')]][1]")
        line = card.locator(".js-plotly-plot .scatterlayer path.js-line").first
        # A drawn line, not a dot.
        expect(line).to_have_attribute("d", re.compile(r".{21,}"), timeout=TIMEOUT_MS)
        page.screenshot(path=shots / "3-run-metric-chart.png")

        # The confusion-matrix artifact, previewed as an image.
        _open(page, f"{base}/#/experiments/{exp}/runs/{run_id}/artifacts", "confusion_matrix.png")
        page.get_by_text("confusion_matrix.png", exact=True).first.click()
        page.get_by_text("mlflow-artifacts:", exact=False).first.wait_for()  # preview header
        # The preview is an <img> (from a blob URL) that has loaded a real picture.
        page.wait_for_function("""() => [...document.images].some(i =>
            i.complete && i.naturalWidth > 100 && i.getBoundingClientRect().width > 100)""")
        page.screenshot(path=shots / "4-run-confusion-matrix.png")

        # The logged model of the run.
        model_id = _logged_model_id(stack, exp, run_id)
        _open(page, f"{base}/#/experiments/{exp}/models/{model_id}", model_id)
        page.get_by_text(run_name).first.wait_for()
        page.get_by_text("Ready", exact=True).first.wait_for()
        page.screenshot(path=shots / "5-logged-model.png")

        # The registered model: every version and both aliases.
        _open(page, f"{base}/#/models/{model}", model)
        for v in trained["versions"]:
            page.get_by_text(f"Version {v}", exact=True).first.wait_for()
        aliases = {"champion": trained["versions"][0], "candidate": trained["versions"][-1]}
        for alias, version in aliases.items():
            row = page.get_by_role("row").filter(
                has=page.get_by_text(f"Version {version}", exact=True))
            row.get_by_text(alias, exact=False).first.wait_for()
        page.screenshot(path=shots / "6-registered-model.png")
    finally:
        page.screenshot(path=shots / "last-page.png")
        ctx.close()
    saved = sorted(p.name for p in shots.glob("*.png"))
    assert len(saved) == 8, saved


def _run_name(stack, run_id: str) -> str:
    import requests

    resp = requests.get(f"{stack.cfg.tracking_uri}/api/2.0/mlflow/runs/get",
                        params={"run_id": run_id},
                        auth=(stack.secrets.admin_username, stack.secrets.admin_password),
                        timeout=30)
    resp.raise_for_status()
    return resp.json()["run"]["info"]["run_name"]
