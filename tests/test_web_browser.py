"""The web console in a real headless Chromium (Debian's `chromium` and `chromium-driver`, via Selenium).

`supportbot web` runs as its own process (uvicorn), on a database with conversations, a real training
run of the tiny model and its candidate adapter. The browser logs in, sees the overview charts drawn,
opens a conversation, promotes the candidate through the real promotion gate and rolls it back.
A screenshot of every page is written to test-artifacts/web/ (ignored by git).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.web import seed
from core.db import Database
from core.settings import Settings
from tests.conftest import ROOT, free_port, settings_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = ROOT / "test-artifacts" / "web"
PASSWORD = "correct horse battery staple"
SECRET = "browser-test-" + "q7w8e9" * 6

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
    ),
]


def _candidate(settings: Settings, db: Database) -> str:
    """A real training run of the tiny model on the seeded, rated conversations: its adapter is the candidate."""
    from bot.privacy import Anonymizer, PrivacyConfig
    from model.export import export
    from model.train import TrainConfig, new_run, run_training

    out = settings.data_dir / "export"
    with db.session() as s:
        # The rules scrub the synthetic conversations; the learned name model is not what this test is about.
        export(session=s, out_dir=out, scrub=Anonymizer(PrivacyConfig(name_model=False)).scrub)
    # Few steps, full precision (bitsandbytes' 4-bit is slow on CPU): enough to beat the base on the gate.
    config = TrainConfig(max_steps=3, learning_rate=3e-3, pack_len=256, batch_rows=1, save_every=0,
                         progress_bar=False, eval_limit=2, load_in_4bit=False, gradient_checkpointing=False,
                         lora_targets="q_proj,v_proj")  # fmt: skip
    with db.session() as s:
        run_id = new_run(session=s, settings=settings, data_dir=out, config=config).id
    result = run_training(settings=settings, database=db, run_id=run_id)
    assert result["status"] == "succeeded", result
    return str(result["version"])


@pytest.fixture
def served(settings: Settings, db: Database) -> Iterator[tuple[str, str]]:
    seed(db, conversations=160, days=28)
    version = _candidate(settings, db)
    env = {**settings_env(settings), "SUPPORTBOT_WEB_SECRET_KEY": SECRET, "SUPPORTBOT_ENVIRONMENT": "test"}
    made = subprocess.run([sys.executable, "-m", "bot.cli", "web", "create-admin", "lead", "--password-stdin"],
                          input=PASSWORD + "\n", env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr
    port = free_port()
    log = open(settings.data_dir / "web.log", "w")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-m", "bot.cli", "web", "--port", str(port)], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (settings.data_dir / "web.log").read_text()
            assert time.monotonic() < deadline, "the console did not start"
            time.sleep(0.3)
        yield url, version
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, name: str) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    assert (ARTIFACTS / f"{name}.png").stat().st_size > 5000


def _wait(condition, timeout: float = 30.0, every: float = 0.5, refresh=None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(every)
        if refresh is not None:
            refresh()


@pytest.mark.timeout(1800)  # trains a candidate and evaluates it through the gate on CPU
def test_console_in_chromium(served: tuple[str, str], browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, version = served
    driver = browser

    # Log in.
    driver.get(url + "/")
    assert "/login" in driver.current_url
    driver.find_element(By.ID, "name").send_keys("lead")
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    _shot(driver, "login")
    driver.find_element(By.ID, "login").click()
    _wait(lambda: driver.current_url.rstrip("/") == url)

    # Overview: three charts drawn with real size, bars and lines inside.
    charts = driver.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(charts) == 3 and all(c.size["height"] > 100 and c.size["width"] > 300 for c in charts)
    bars = driver.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar")
    assert len(bars) >= 20 and all(b.size["height"] > 0 for b in bars[:20])
    assert len(driver.find_elements(By.CSS_SELECTOR, "svg.chart polyline.line")) >= 2
    assert driver.find_element(By.ID, "questions").text == "160"
    _shot(driver, "overview")

    # Conversations, filtered to the rated 👍 ones, then one transcript with its answer.
    driver.find_element(By.LINK_TEXT, "Conversations").click()
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "a.conversation-link"))
    _shot(driver, "conversations")
    Select(driver.find_element(By.NAME, "rating")).select_by_value("good")
    driver.find_element(By.CSS_SELECTOR, "form.filters button").click()
    _wait(lambda: "rating=good" in driver.current_url)
    driver.find_elements(By.CSS_SELECTOR, "a.conversation-link")[0].click()
    transcript = _wait(lambda: driver.find_elements(By.ID, "transcript"))[0]
    assert "user 1" in transcript.text and "Sources: T-" in transcript.text
    assert driver.find_element(By.CSS_SELECTOR, ".model-version").text == "smollm2-135m-instruct"
    _shot(driver, "conversation")

    for page in ("Escalations", "Tickets", "Training", "Audit"):
        driver.find_element(By.LINK_TEXT, page).click()
        _wait(lambda page=page: driver.title.startswith(page))
        _shot(driver, page.lower())
    driver.find_element(By.LINK_TEXT, "Training").click()
    driver.find_elements(By.CSS_SELECTOR, "#runs a")[0].click()
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "svg.chart polyline.line"))
    _shot(driver, "training-run")

    # Models: promote the candidate through the gate (evaluated by the console), then roll back.
    driver.find_element(By.LINK_TEXT, "Models").click()
    assert driver.find_element(By.ID, "serving").text == "the base model"
    _shot(driver, "models")
    driver.find_element(By.CSS_SELECTOR, f"#model-{version} button.promote").click()
    assert "through the promotion gate" in _wait(lambda: driver.find_elements(By.ID, "flash"))[0].text

    def status() -> str:
        return driver.find_element(By.CSS_SELECTOR, f"#model-{version} .status").text

    _wait(lambda: status() != "candidate" and "evaluating" not in driver.page_source, timeout=300, every=2,
          refresh=driver.refresh)  # fmt: skip
    assert status() == "active", driver.find_element(By.ID, "models").text
    assert driver.find_element(By.ID, "serving").text == version
    _shot(driver, "models-promoted")

    driver.find_element(By.ID, "rollback").click()
    _wait(lambda: driver.find_elements(By.ID, "flash"))
    assert driver.find_element(By.ID, "serving").text == "the base model"
    assert status() == "retired"
    _shot(driver, "models-rolled-back")

    driver.find_element(By.LINK_TEXT, "Audit").click()
    audit = driver.find_element(By.ID, "audit").text
    assert "web:lead admin models.promote succeeded" in audit and "web:lead admin models.rollback succeeded" in audit
    _shot(driver, "audit-after")
