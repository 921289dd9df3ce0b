"""A real browser on the FastAPI example: Swagger UI's Authorize, Try it out and Execute.

Headless Chromium (Debian's ``chromium`` and ``chromium-driver``, which ``.ci/run``
installs) loads ``/docs`` from the example under uvicorn. Swagger UI comes from the
installed ``swagger-ui-bundle`` package, so this also shows that the page needs no CDN.
Without the browser the test skips with the reason, except in CI
(``KEYGUARD_REQUIRE_SERVICES=1``), where it fails.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import service_unavailable
from tests.test_e2e import Server, free_port, run_key_script, server_env, start

FAKE_KEY = "sk_" + "0" * 32  # well formed, never issued
WAIT = 30.0


@pytest.fixture(scope="module")
def fastapi_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """The FastAPI example under uvicorn, and the URL of its store."""
    directory = tmp_path_factory.mktemp("browser")
    store_url = f"sqlite:///{directory / 'keyguard.db'}"
    port = free_port()
    argv = [
        *(sys.executable, "-m", "uvicorn", "examples.fastapi_app:app"),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]
    running = start("fastapi under uvicorn", argv, server_env(store_url), directory / "log", port)
    yield running, store_url
    running.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium driven through chromedriver; skips (or fails in CI) without them."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        service_unavailable("selenium is not installed (pip install -e '.[dev]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        service_unavailable(
            "Chromium or chromedriver is missing (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def authorize(driver: Any, key: str) -> str:
    """Paste ``key`` into the bearer scheme of Swagger UI's Authorize dialog; its text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(driver, WAIT)
    wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "button.authorize"))).click()
    dialog = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, ".dialog-ux")))
    bearer = next(
        box
        for box in dialog.find_elements(By.CSS_SELECTOR, ".auth-container")
        if "APIKeyBearer" in box.text
    )
    text: str = bearer.text
    logout = bearer.find_elements(By.XPATH, ".//button[normalize-space()='Logout']")
    if logout:
        logout[0].click()
    bearer.find_element(By.CSS_SELECTOR, "input").send_keys(key)
    bearer.find_element(By.XPATH, ".//button[normalize-space()='Authorize']").click()
    dialog.find_element(By.XPATH, ".//button[normalize-space()='Close']").click()
    wait.until(ready.invisibility_of_element_located((By.CSS_SELECTOR, ".dialog-ux")))
    return text


def execute_whoami(driver: Any) -> str:
    """Run ``GET /whoami`` through "Try it out" / "Execute"; the status Swagger UI shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(driver, WAIT)
    operation = wait.until(
        ready.presence_of_element_located((By.CSS_SELECTOR, "[id^='operations-'][id*='whoami']"))
    )
    if "is-open" not in (operation.get_attribute("class") or ""):
        operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    # The operation's body renders after the click: wait for its button, never assume it.
    try_out = wait.until(lambda d: operation.find_elements(By.CSS_SELECTOR, "button.try-out__btn"))
    if try_out[0].text.strip() == "Try it out":
        try_out[0].click()
    clear = operation.find_elements(By.CSS_SELECTOR, "button.btn-clear")
    if clear:
        clear[0].click()  # forget the previous answer, so the wait below sees the new one
    wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "button.execute"))).click()
    selector = ".live-responses-table .response .response-col_status"
    status = wait.until(
        lambda d: next(
            (e.text.strip() for e in operation.find_elements(By.CSS_SELECTOR, selector)), ""
        )
    )
    return str(status)


def test_swagger_ui_authorize_try_it_out_and_execute(
    fastapi_server: tuple[Server, str], browser: Any, tmp_path: Path
) -> None:
    running, store_url = fastapi_server
    key = run_key_script(store_url, "create", "alice", "read")
    browser.get(f"{running.base_url}/docs")

    try:
        dialog_text = authorize(browser, key)
        assert "Authorization: Bearer <key>" in dialog_text
        assert execute_whoami(browser) == "200"

        authorize(browser, FAKE_KEY)
        assert execute_whoami(browser) == "401"
    except Exception:
        browser.save_screenshot(str(tmp_path / "swagger.png"))
        print(f"screenshot: {tmp_path / 'swagger.png'}\nserver log:\n{running.output()}")
        raise
    assert key not in running.output()
