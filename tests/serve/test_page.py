"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver) loads it, submits a
request, waits for the previews and the final grid, checks the image size, an invalid input's error and that a
hostile class name stays text. Screenshot: $ARGEN_ARTIFACTS/serve.png (and the test's tmp folder)."""

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="argen serve needs the serve extra: pip install -e '.[dev]'")
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="the browser test needs selenium: pip install -e '.[dev]'"
)
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip(
        "chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver; .ci/run does)",
        allow_module_level=True,
    )

import uvicorn  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from argen.pipeline import ARPipeline  # noqa: E402
from argen.serve.app import create_app  # noqa: E402

HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture(scope="module")
def url():
    raster, next_scale = ARPipeline.from_pretrained("raster"), ARPipeline.from_pretrained("next-scale")
    hostile = ARPipeline(raster.tokenizer, raster.generator, [HOSTILE, *raster.class_names[1:]], raster.sampler)
    app = create_app({"next-scale": next_scale, "raster": hostile})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1100,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def natural_size(browser, selector):
    return browser.execute_script(
        "const i = document.querySelector(arguments[0]); return i && i.complete ? [i.naturalWidth, i.naturalHeight] "
        ": null;",
        selector,
    )


def test_page_generates_with_previews_and_shows_errors(browser, url, tmp_path):
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
    Select(browser.find_element(By.ID, "model")).select_by_value("next-scale")
    wait.until(lambda b: "next-scale" in b.find_element(By.ID, "order").text)
    seed = browser.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("7")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: natural_size(b, "#grid img"))
    # 4 classes (the first four are ticked) x 1 image: a column of 28 px digits with 2 px gaps
    assert natural_size(browser, "#grid img") == [32, 4 * 30 + 2]
    assert natural_size(browser, "#preview img") == [32, 4 * 30 + 2]  # the last preview stays
    maps = len(ARPipeline.from_pretrained("next-scale").tokenizer.scales)  # one step per map: 7 since session 16
    assert f"step {maps - 1} of {maps}" in browser.find_element(By.ID, "step").text  # the last preview, 0-based
    links = browser.find_elements(By.CSS_SELECTOR, "#downloads a")
    assert len(links) == 4 and links[0].get_attribute("download") == "argen-next-scale-seed7-0.png"
    assert browser.find_element(By.ID, "error").text == ""
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("ARGEN_ARTIFACTS"):
        Path(os.environ["ARGEN_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["ARGEN_ARTIFACTS"]) / "serve.png")

    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("-1")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: b.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text.startswith("temperature: temperature must be >= 0")


def test_class_names_stay_text(browser, url):
    wait = WebDriverWait(browser, 30)
    browser.get(url)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
    Select(browser.find_element(By.ID, "model")).select_by_value("raster")
    wait.until(lambda b: HOSTILE in b.find_element(By.ID, "classes").text)
    assert browser.find_elements(By.CSS_SELECTOR, "#classes img") == []
    assert browser.title == "argen"
