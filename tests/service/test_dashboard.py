"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright)
against the embedded service (`unlearn serve`): sign in, submit a job from the form with
files uploaded there, watch it run live to succeeded, read the table, the curves and the
evidence, download the adapter; a bad file and a bad hyperparameter shown where they
are; a second tenant's key sees none of it. The screenshots in docs/screenshots/ are
this test's (UPDATE_SCREENSHOTS=1 writes them there; otherwise under the test's tmp)."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import ROOT, cli, embedded_env, free_port, wait_http

pytestmark = pytest.mark.slow


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    assert path, (
        "Chromium is not installed: the dashboard's browser test needs it "
        "(scripts/bootstrap.sh installs Debian's chromium; or set CHROMIUM to a binary)"
    )
    return path


@pytest.fixture(scope="module")
def served(fixture_dir, tmp_path_factory):
    state = tmp_path_factory.mktemp("dashboard")
    env = embedded_env(state / "state")
    cli(env, "models", "add", "tiny", str(fixture_dir / "model"), "--description", "test fixture")
    keys = {
        tenant: cli(env, "keys", "create", "--tenant", tenant).strip().splitlines()[-1]
        for tenant in ("acme", "globex")
    }
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=(state / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", server)
        yield {"url": f"http://127.0.0.1:{port}", "keys": keys, "state": state}
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)


@pytest.fixture(scope="module")
def browser(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield browser
        browser.close()


@pytest.fixture
def shots(tmp_path):
    target = ROOT / "docs" / "screenshots" if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path
    target.mkdir(parents=True, exist_ok=True)
    return target


def sign_in(page, url: str, key: str) -> None:
    page.goto(f"{url}/dashboard")
    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Enter")  # the keyboard submits the form
    page.get_by_role("heading", name="Jobs").wait_for()


def test_a_job_from_the_form_to_its_download_in_a_real_browser(
    served, browser, fixture_dir, tmp_path, shots
):
    data = fixture_dir / "data"
    context = browser.new_context(viewport={"width": 1366, "height": 900}, accept_downloads=True)
    page = context.new_page()
    failures: list[str] = []
    page.on("pageerror", lambda error: failures.append(str(error)))
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    url = served["url"]

    # A wrong key is refused on the sign-in form itself.
    page.goto(f"{url}/dashboard")
    assert page.get_by_label("API key").evaluate("el => el === document.activeElement")
    page.get_by_label("API key").fill("ul_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").filter(has_text="This API key was refused").wait_for()
    sign_in(page, url, served["keys"]["acme"])

    # The form is built from /v1/methods: catnip's defaults are there; every field has a label.
    page.get_by_role("link", name="New job").click()
    page.locator("#hyperparameters-beta").wait_for()
    from core.engine.spec.params import CatnipParams

    assert float(page.locator("#hyperparameters-beta").input_value()) == CatnipParams().beta
    unlabelled = page.evaluate(
        "[...document.querySelectorAll('form input, form select, form textarea')]"
        ".filter(el => !el.labels || el.labels.length === 0).map(el => el.id)"
    )
    assert unlabelled == [], unlabelled
    page.locator("#forget_file-upload").set_input_files(data / "forget_qa.jsonl")
    page.locator("#eval-forget_qa-upload").set_input_files(data / "forget_qa.jsonl")
    page.locator("#eval-retain_qa-upload").set_input_files(data / "retain_qa.jsonl")
    page.locator("#eval-holdout-upload").set_input_files(data / "holdout_qa.jsonl")
    page.locator("#hyperparameters-learning_rate").fill("0.01")
    page.locator("#hyperparameters-batch_size").fill("16")
    page.locator("#hyperparameters-max_length").fill("64")
    page.locator("#eval-max_samples").fill("60")
    page.locator("#eval-probe_every").fill("2")
    page.locator("#eval-advanced").fill(
        '{"utility_budget": 1.0, "criteria": {"forget_knowmem_max_ratio": 0.95}}'
    )
    page.locator("#job-metadata").fill("ticket=B-1")
    # A bad hyperparameter: the service's 422 is shown at the field it names.
    page.locator("#hyperparameters-max_steps").fill("0")
    page.get_by_role("button", name="Submit job").click()
    page.locator("#form-error").filter(has_text="Not submitted").wait_for()
    assert page.locator("#hyperparameters-max_steps").get_attribute("aria-invalid") == "true"
    assert page.locator("#hyperparameters-max_steps-error").inner_text().strip()
    page.screenshot(path=str(shots / "dashboard-new-job.png"), full_page=True)
    # the files went up once: the form now names them instead of uploading them again
    assert page.locator("#forget_file-existing").input_value().startswith("file-")
    page.locator("#hyperparameters-max_steps").fill("8")
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_url("**/dashboard#/jobs/job-*")
    job_id = page.url.rsplit("/", 1)[-1]

    # Live: the curve and the progress bar fill in while the job is still active, on the
    # page as it was first loaded (no reload: events come over the SSE stream).
    page.evaluate("() => { window.loadedOnce = true; }")
    page.wait_for_function(
        "() => document.querySelector('svg.chart polyline') && "
        "document.querySelector('#job-progress').value >= 1 && "
        "!document.querySelector('#job-status .badge.succeeded')",
        timeout=240_000,
    )
    assert page.evaluate("() => window.loadedOnce === true")
    page.screenshot(path=str(shots / "dashboard-job-running.png"), full_page=True)
    page.locator("#job-status .badge.succeeded").wait_for(timeout=300_000)
    page.get_by_role("heading", name="Before and after").wait_for(timeout=30_000)
    # done: the bar is full even where the stop rule ended the job before its planned steps
    assert page.evaluate(
        "() => { const p = document.querySelector('#job-progress'); return p.value === p.max; }"
    )
    table = page.get_by_role("table", name="Before and after").inner_text()
    assert "Forget KnowMem ROUGE-L F1" in table and "Retain KnowMem ROUGE-L F1" in table
    key = {"Authorization": f"Bearer {served['keys']['acme']}"}
    events = httpx.get(f"{url}/v1/jobs/{job_id}/events?limit=100", headers=key).json()["data"]
    steps = [e["data"]["step"] for e in events if e["type"] == "step"]
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1))  # the stop rule may end it
    points = page.locator("svg.chart .line-0").first.get_attribute("points") or ""
    assert len(points.split()) == len(steps), points  # every step, each once
    criteria = page.get_by_role("table", name="Criteria")
    # named in words, the spec's name in the tooltip; headers over their values
    assert "Forget score after / before" in criteria.inner_text()
    assert "forget_knowmem_max_ratio" not in criteria.inner_text()
    assert criteria.locator("td[title='eval.criteria.forget_knowmem_max_ratio']").count() == 1
    aligned = criteria.evaluate(
        "t => [...t.tHead.rows[0].cells].map((th, i) => "
        "getComputedStyle(th).textAlign === getComputedStyle(t.tBodies[0].rows[0].cells[i]).textAlign)"
    )
    assert all(aligned), aligned
    assert page.locator("svg.chart").nth(1).locator("polyline").count() == 2  # forget, utility
    assert page.get_by_text("Verdict:").first.is_visible()
    # the status line says the verdict too: a succeeded job may fail its criteria
    assert page.locator("#job-status .badge.pass, #job-status .badge.fail").count() == 1
    assert page.get_by_text("Membership inference").first.is_visible()
    # The relearning sweep: a row per cell of the job's metrics, the worst cell marked.
    relearn = httpx.get(f"{url}/v1/jobs/{job_id}/metrics", headers=key).json()["metrics"][
        "robustness"
    ]["relearn"]
    assert relearn["status"] == "done" and relearn["cells"], relearn
    cells = page.get_by_role("table", name="Relearning sweep")
    assert cells.locator("tbody tr").count() == len(relearn["cells"])
    worst = cells.locator("tbody tr.worst")
    assert worst.count() == 1 and worst.locator(".badge.worst").count() == 1
    worst_cell = next(c for c in relearn["cells"] if c["cell"] == relearn["worst_cell"])
    assert f"{100 * worst_cell['forget_knowmem_f1']:.1f}" in worst.inner_text()
    # The certificate line says what is signed, and how.
    downloads = page.locator("#downloads").inner_text()
    assert "in-toto statement in a DSSE envelope, signed with Ed25519" in downloads
    assert "adapter directory signed with OpenSSF model signing" in downloads
    page.get_by_role("heading", name="Token probabilities on forget answers").wait_for()
    assert page.locator(".tokens span[title]").count() > 4
    assert "probability the model gives it" in page.locator("#token-legend").inner_text()

    # Viewing the page read the report for display: no download in the audit log, and a
    # second view adds nothing to it.
    def audit_log() -> list[dict]:
        answer = httpx.get(f"{url}/v1/audit?limit=100", headers=key)
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]

    viewed = audit_log()
    assert not [e for e in viewed if e["action"] == "artifact.downloaded"], viewed
    page.reload()
    page.locator(".tokens span[title]").first.wait_for()
    assert audit_log() == viewed
    page.screenshot(path=str(shots / "dashboard-job.png"), full_page=True)

    with page.expect_download() as download_info:
        page.locator("[data-artifact='adapter']").click()
    download = download_info.value
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    listed = httpx.get(f"{url}/v1/jobs/{job_id}/artifacts", headers=key).json()["data"]
    adapter = next(a for a in listed if a["name"] == "adapter")
    assert download.suggested_filename == adapter["filename"]
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == adapter["sha256"]

    # The list: the job, live status, filterable by metadata.
    page.get_by_role("link", name="Jobs").click()
    row = page.get_by_role("row").filter(has_text=job_id)
    row.get_by_text("succeeded").wait_for()
    done = httpx.get(f"{url}/v1/jobs/{job_id}", headers=key).json()
    verdict = done["verdict"]
    assert verdict in ("pass", "fail")
    assert done["progress"]["phase"] is None  # no phase once finished
    assert row.locator(f".badge.{verdict}").inner_text() == verdict  # beside the status
    page.screenshot(path=str(shots / "dashboard-jobs.png"), full_page=True)
    page.locator("#filter-metadata").fill("ticket=nope")
    page.get_by_role("button", name="Filter").click()
    page.get_by_text("No jobs.").wait_for()
    page.locator("#filter-metadata").fill("ticket=B-1")
    page.get_by_role("button", name="Filter").click()
    page.get_by_role("row").filter(has_text=job_id).wait_for()

    # With a job run on this model, the form says what a job will cost in time too.
    page.get_by_role("link", name="New job").click()
    page.locator("#hyperparameters-batch_size").wait_for()
    page.locator("#forget_file-existing").select_option(index=1)
    page.locator("#hyperparameters-max_steps").fill("30")
    cost = page.locator("#job-cost")
    cost.filter(has_text=f"At the pace of your job {job_id}").wait_for()
    assert "30 optimizer steps (max_steps)" in cost.inner_text()

    # Files: an invalid upload shows which line and which field.
    (tmp_path / "broken.jsonl").write_text(
        '{"prompt": "Who rides Vex?", "response": "Ona."}\n{"prompt": "Q"}\n'
    )
    page.get_by_role("link", name="Files").click()
    forget_uploads = (
        page.get_by_role("row").filter(has_text="forget_qa.jsonl").filter(has_text="forget")
    )
    forget_uploads.first.wait_for()
    assert page.locator("tbody .badge.valid").count() == 4  # forget + 3 eval, once each
    page.get_by_label("File (JSONL or .txt)").set_input_files(tmp_path / "broken.jsonl")
    page.get_by_role("button", name="Upload").click()
    result = page.locator("#upload-result")
    result.locator(".badge.invalid").wait_for()
    problem = result.get_by_role("row").filter(has_text="response")
    assert problem.locator("td").first.inner_text() == "2"
    page.screenshot(path=str(shots / "dashboard-files.png"), full_page=True)
    assert not failures, failures

    # Another tenant signs in on the same browser: none of it is there.
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, url, served["keys"]["globex"])
    page.get_by_text("No jobs.").wait_for()
    page.goto(f"{url}/dashboard#/jobs/{job_id}")
    page.get_by_role("alert").filter(has_text=f"No job {job_id} among yours").wait_for()
    page.get_by_role("link", name="Files").click()
    page.get_by_text("No files.").wait_for()
    context.close()


def test_the_page_is_served_offline_with_a_strict_policy(served):
    page = httpx.get(f"{served['url']}/dashboard")
    assert page.status_code == 200 and "<script" in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    # every asset it loads is the service's own
    for asset in ("/dashboard/static/app.js", "/dashboard/static/style.css"):
        assert asset in page.text
        assert httpx.get(served["url"] + asset).status_code == 200
    assert "http" not in page.text.replace(
        '"http://www.w3.org', ""
    )  # no CDN: nothing absolute is fetched
    assert (
        httpx.get(served["url"] + "/", follow_redirects=False).headers["location"] == "/dashboard"
    )
    app_js = Path(ROOT / "api" / "dashboard" / "app.js").read_text()
    assert "innerHTML" not in app_js  # text goes in as text: a filename cannot inject markup


def test_sign_in_page_form_labels_defaults_and_cost(served, browser, fixture_dir):
    """The sign-in page has no navigation, a refusal's toast does not outlive a good
    sign-in, and keyboard sign-in rings no whole page; the form's labels read as people
    write them, its defaults are the method registry's (per method), and it says how
    many steps a job with them makes on the chosen forget file; no page asks for a
    resource that is not there (the favicon)."""
    from core.engine.spec.methods import METHODS

    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    url = served["url"]
    page.goto(f"{url}/dashboard")
    page.get_by_label("API key").wait_for()
    assert not page.get_by_role("navigation").is_visible()
    assert not page.get_by_role("link", name="New job").is_visible()
    # signed out: the toast says so; then a good sign-in clears it
    page.get_by_label("API key").fill(served["keys"]["acme"])
    page.get_by_label("API key").press("Enter")
    page.get_by_role("heading", name="Jobs").wait_for()
    assert page.get_by_role("navigation").is_visible()
    page.get_by_role("button", name="Sign out").click()
    page.locator("#toast").filter(has_text="Signed out.").wait_for()
    assert not page.get_by_role("navigation").is_visible()
    page.get_by_label("API key").fill(served["keys"]["acme"])
    page.get_by_label("API key").press("Enter")
    page.get_by_role("heading", name="Jobs").wait_for()
    assert page.locator("#toast").inner_text() == ""
    ring = page.evaluate(
        "() => { const m = document.querySelector('main'); const s = getComputedStyle(m);"
        " return [document.activeElement === m, s.outlineStyle, s.outlineWidth]; }"
    )
    assert ring[0] and (ring[1] == "none" or ring[2] == "0px"), ring

    page.get_by_role("link", name="New job").click()
    page.locator("#hyperparameters-sam_rho").wait_for()
    label = lambda field: page.locator(f"label[for='hyperparameters-{field}']").evaluate(  # noqa: E731
        "l => l.firstChild.textContent"
    )
    assert label("sam_rho") == "SAM rho" and label("forget_eos") == "Forget EOS"
    assert label("learning_rate") == "Learning rate" and label("max_length") == "Max length"
    for method in ("catnip", "npo"):
        page.locator("#job-method").select_option(method)
        defaults = METHODS[method].params()
        shown = page.locator("#hyperparameters-learning_rate").input_value()
        assert float(shown) == defaults.learning_rate, (method, shown)
        assert int(page.locator("#hyperparameters-batch_size").input_value()) == defaults.batch_size
    page.locator("#job-method").select_option("catnip")
    cost = page.locator("#job-cost")
    cost.filter(has_text="choose or upload a forget set").wait_for()
    forget = fixture_dir / "data" / "forget_qa.jsonl"
    records = sum(1 for line in forget.read_text().splitlines() if line.strip())
    page.locator("#forget_file-upload").set_input_files(forget)
    catnip = METHODS["catnip"].params()
    steps = math.ceil(catnip.epochs * math.ceil(records / catnip.batch_size))
    cost.filter(has_text=f"{steps:,} optimizer steps").wait_for()
    assert f"{records} records" in cost.inner_text()
    assert "Time: not known" in cost.inner_text() or "At the pace of your job" in cost.inner_text()
    page.locator("#hyperparameters-batch_size").fill("32")
    page.locator("#hyperparameters-epochs").fill("2")
    cost.filter(has_text=f"{2 * -(-records // 32):,} optimizer steps").wait_for()
    favicon = httpx.get(f"{url}/favicon.ico")
    assert favicon.status_code == 200 and favicon.headers["content-type"].startswith("image/")
    assert not missing, missing
    context.close()
