"""The service's web page in headless Chromium: add a document, ask, see answer and chunk."""

import shutil

import pytest

from retro_jax.serving.app import create_app
from serving_utils import running_server
from test_serving_api import _service

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="Debian chromium and chromium-driver are not installed")]


@pytest.fixture
def browser(tmp_path):
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  driver.set_page_load_timeout(30)
  yield driver
  driver.quit()


def _wait_for(driver, predicate, timeout=30):
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  WebDriverWait(driver, timeout).until(lambda d: predicate(d))


def test_add_document_ask_and_see_answer_and_chunk(browser):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  with running_server(create_app(_service())) as url:
    browser.get(url + "/")
    _wait_for(browser, lambda d: "0 documents" in d.find_element(By.ID, "status").text)
    browser.find_element(By.ID, "doc-title").send_keys("Inventors")
    browser.find_element(By.ID, "doc-text").send_keys(
        "the inventor lira moss built a clock that runs on rain water")
    browser.find_element(By.ID, "add-btn").click()
    _wait_for(browser, lambda d: "1 documents" in d.find_element(By.ID, "status").text)
    browser.find_element(By.ID, "question").send_keys("who built the rain clock")
    browser.find_element(By.ID, "ask-btn").click()
    _wait_for(browser, lambda d: d.find_element(By.ID, "answer").text not in ("", "…"))
    answer = browser.find_element(By.ID, "answer").text
    chunks = browser.find_elements(By.CSS_SELECTOR, "#retrieved .chunk")
    assert answer and chunks
    assert "Inventors" in chunks[0].text and "clock" in chunks[0].text
    assert browser.find_element(By.ID, "error").text == ""
