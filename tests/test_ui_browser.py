"""The real UI server driven by headless Chromium: ask a question, see the answer and metrics.

It runs on the real default model (SmolLM2-135M), so the answer and the screenshot are real.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; skipped
otherwise. Saves a screenshot of the Ask page to ``benchmarks/results/ui_ask.png``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "ui_ask.png"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,1000")

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("needs chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)
pytest.importorskip("streamlit")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from ragkv.ui.launch import build_command  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the UI server did not come up")


@pytest.fixture(scope="module")
def server(tmp_path_factory, smol_path: Path) -> Iterator[str]:
    from ragkv.api import RagKV
    from ragkv.config import RagkvConfig

    home = tmp_path_factory.mktemp("ui-home")
    rag = RagKV(RagkvConfig(home=home, model=smol_path))
    rag.ingest_text("assert.md", "The assert statement checks a condition and raises "
                                 "AssertionError when it is false.\n\n" * 25)
    rag.ingest_text("with.txt", "A with statement wraps a block in a context manager.\n" * 30)
    rag.index.close()
    port = free_port()
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(build_command(home, smol_path, port=port), stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    url = f"http://localhost:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="ragkv-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    # An explicit driver path: Selenium then never tries to download one.
    driver = webdriver.Chrome(options=opts,
                              service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def metric_values(driver) -> dict[str, str]:
    out = {}
    for m in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]'):
        label = m.find_element(By.CSS_SELECTOR, '[data-testid="stMetricLabel"]').text.strip()
        value = m.find_element(By.CSS_SELECTOR, '[data-testid="stMetricValue"]').text.strip()
        out[label] = value
    return out


def click_when_ready(driver, xpath: str, timeout: float = 180) -> None:
    try:
        WebDriverWait(driver, timeout).until(
            ec.element_to_be_clickable((By.XPATH, xpath))).click()
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"{xpath} never became clickable; the page shows:\n{body}")


def test_ask_in_browser_shows_answer_and_metrics(server: str, browser) -> None:
    wait = WebDriverWait(browser, 180)
    browser.get(server)
    box = wait.until(ec.element_to_be_clickable(
        (By.CSS_SELECTOR, 'input[aria-label="Question"]')))
    box.send_keys("What does the assert statement do?")
    # Streamlit sends a form's widgets one by one: the question box can be ready before the
    # rest of the form is in the page, so wait for each control before clicking it.
    measure = "//label[contains(., 'Measure full prefill')]"
    click_when_ready(browser, measure)
    WebDriverWait(browser, 30).until(  # the click reached the widget, not a page still loading
        lambda d: d.find_element(By.XPATH, f"{measure}//input[@type='checkbox']").is_selected())
    click_when_ready(browser, "//button[.//p[text()='Ask']]")
    wait.until(lambda d: "Speed-up" in metric_values(d)
               and metric_values(d)["Speed-up"].startswith("x"))
    # The page writes this caption once the answer has streamed to the end.
    wait.until(lambda d: "tokens generated" in d.find_element(By.TAG_NAME, "body").text)
    values = metric_values(browser)
    assert values["TTFT (this answer)"].endswith("ms")
    assert values["Full-prefill TTFT"].endswith("ms")
    assert "measured just now" in browser.page_source
    body = browser.find_element(By.TAG_NAME, "body").text
    answer = body.split("Answer", 1)[1].split("tokens generated", 1)[0]
    assert answer.strip() and "empty answer" not in answer, body
    assert browser.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]')
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
