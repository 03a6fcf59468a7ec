"""Screenshots of TensorBoard over a run's logs, taken in a real headless Chromium (docs/tensorboard.md).

    tensorboard --logdir logs --port 6006 &
    python docs/tensorboard_screenshots.py http://localhost:6006 docs/

Needs ``selenium`` and a Chromium with its driver (Debian: ``apt-get install chromium chromium-driver``); neither
is a dependency of lit-factor. Writes ``tensorboard_time_series.png`` (the landing page), ``tensorboard_scalars.png``,
``tensorboard_hparams.png`` and ``tensorboard_images.png`` as small palette PNGs, and prints the order of the tag
groups each dashboard shows (what tests/test_board.py assumes: code-point order of the group names).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

#: forceSVG: Time Series draws its charts with WebGL by default, which a headless browser without a GPU leaves blank
PAGES = {"time_series": "?forceSVG=true#timeseries", "scalars": "#scalars", "hparams": "#hparams",
         "images": "#images"}


def browser(width: int = 1280, height: int = 960):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def close_settings(driver) -> None:
    """Time Series opens its settings pane on a first visit: close it, as a user would, to see the charts."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close side pane'], "
                                                        "button[aria-label*='lose']"):
        if button.is_displayed():
            button.click()
            time.sleep(2)
            return


def small_png(path: Path) -> None:
    """A 128-colour palette PNG: a tenth of the size, still sharp for text and lines."""
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)


def main(url: str, out: str, wait: float = 10.0) -> int:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    driver = browser()
    try:
        for name, fragment in PAGES.items():
            driver.get(url.rstrip("/") + "/" + fragment)
            time.sleep(wait)  # the dashboards load their data asynchronously
            if name == "time_series":
                close_settings(driver)
            path = out_dir / f"tensorboard_{name}.png"
            driver.save_screenshot(str(path))
            small_png(path)
            text = driver.execute_script("return document.body.innerText")
            print(f"{name}: {path} ({path.stat().st_size // 1024} KB); first lines: "
                  + " | ".join(line.strip() for line in text.splitlines() if line.strip())[:400])
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
