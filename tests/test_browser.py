"""The web app in a real browser: Debian's Chromium, driven by Selenium through Debian's
chromedriver (no browser or driver is downloaded). ``make test-browser`` installs both and runs
this; ``make test`` / ``make test-all`` leave it out (the ``browser`` marker). Without Chromium
the test fails, saying how to install it.

The browser is kept on this machine: every host name but the server's resolves to nothing
(``--host-resolver-rules``) and Chromium's background services are off.
"""

from __future__ import annotations

import os
import shutil

import pytest
import skimage.data
from app_server import serve_app

ASTRONAUT = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")
INSTALL = "apt-get install chromium chromium-driver (make test-browser installs them)"
# Where to keep the screenshot besides the test's folder (README's docs/app.png).
SCREENSHOT_ENV = "PV_JAX_SCREENSHOT"

CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",  # root in a container
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--window-size=1400,1300",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-domain-reliability",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)


def _chromium() -> tuple[str, str]:
    """Debian's Chromium and chromedriver, or a failure that says how to install them."""
    found = []
    for env, name in (("CHROMIUM", "chromium"), ("CHROMEDRIVER", "chromedriver")):
        path = shutil.which(os.environ.get(env) or name)
        if not path:
            pytest.fail(f"{os.environ.get(env) or name} is not installed: {INSTALL}", pytrace=False)
        found.append(path)
    return found[0], found[1]


@pytest.mark.browser
def test_upload_generate_and_see_the_gallery(tmp_path):
    """Upload the astronaut, press Generate with the page's defaults (4 images, 25 steps, the
    tuned guidance), wait for the gallery, save a screenshot; the page showed the progress, the
    gallery holds 4 images, each captioned with its identity similarity, and the detected face
    is shown."""
    browser, driver_path = _chromium()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError as e:
        pytest.fail(f"selenium is not installed ({e}): pip install -e '.[browser]'", pytrace=False)

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager is not run: paths given
    with serve_app(tmp_path / "app") as server:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            driver.get(server.url)
            wait = WebDriverWait(driver, 60)
            upload = wait.until(
                lambda d: d.find_element(By.CSS_SELECTOR, "#photos input[type=file]")
            )
            upload.send_keys(ASTRONAUT)
            wait.until(lambda d: "astronaut" in d.find_element(By.ID, "photos").text)  # uploaded
            driver.find_element(By.ID, "generate").click()

            progress = set()

            def gallery(d):
                """The results once there; meanwhile, the progress the page shows."""
                images = d.find_elements(By.CSS_SELECTOR, "#results img")
                if len(images) >= 4:
                    return images
                body = d.find_element(By.TAG_NAME, "body").text
                progress.update(line for line in body.splitlines() if "sampling" in line)
                return False

            images = WebDriverWait(driver, 400, poll_frequency=1).until(gallery)
            wait.until(lambda d: "identity" in d.find_element(By.ID, "status").text)
            status = driver.find_element(By.ID, "status").text
            page = driver.find_element(By.TAG_NAME, "body").text
            shot = tmp_path / "app.png"
            driver.save_screenshot(str(shot))
            faces = driver.find_elements(By.CSS_SELECTOR, "#faces img")
            loaded = driver.execute_script(
                "return arguments[0].map(i => i.complete && i.naturalWidth)", images
            )
        finally:
            driver.quit()
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copy(shot, os.environ[SCREENSHOT_ENV])
    print(f"\nscreenshot: {shot}\nstatus: {status}\nprogress: {sorted(progress)}")
    assert "4 images in" in status and "compile" in status, status
    assert len(images) == 4 and all(w == 64 for w in loaded), loaded  # the toy model's 64 px
    assert page.count("identity") >= 4  # the captions
    assert faces, "the detected face crop and mask are not shown"
    assert any("sampling 4 images" in line for line in progress), progress
    assert shot.stat().st_size > 10_000
