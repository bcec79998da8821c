"""Drives the web page of a running `skillet serve` in headless Chromium
(Debian's chromium and chromium-driver, installed by
scripts/browser-env.sh): key → upload → start a job → watch it finish →
ask the tuned model beside the base model. Saves screenshots. Run by
tests/jobs_api.rs; exits non-zero with a message on the first failed
check.

    python web_page.py --url http://127.0.0.1:PORT/ --key KEY --train FILE --shots DIR
"""

import argparse
import os
import shutil
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--shots", required=True)
    a = ap.parse_args()
    os.makedirs(a.shots, exist_ok=True)

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)
    try:
        run(driver, a)
    except Exception:
        driver.save_screenshot(os.path.join(a.shots, "failure.png"))
        raise
    finally:
        driver.quit()


def run(driver, a):
    find = driver.find_element
    wait = lambda secs, cond, what: WebDriverWait(driver, secs, poll_frequency=0.2).until(  # noqa: E731
        lambda d: cond(), message=what
    )
    shot = lambda name: driver.save_screenshot(os.path.join(a.shots, name))  # noqa: E731
    # The page redraws its parts as it polls: read them by id each time.
    options = lambda id: driver.execute_script(  # noqa: E731
        "return Array.from(document.getElementById(arguments[0]).options).map(o => o.value)", id
    )
    text = lambda id: driver.execute_script(  # noqa: E731
        "const e = document.getElementById(arguments[0]); return e ? e.textContent : ''", id
    )

    driver.get(a.url)
    check(driver.title == "Skillet", "the page loads without a key")
    find(By.ID, "key").send_keys(a.key)
    find(By.ID, "save-key").click()

    # Upload a file and start a job.
    find(By.CSS_SELECTOR, "nav button[data-tab=new]").click()
    find(By.ID, "upload-file").send_keys(os.path.abspath(a.train))
    find(By.ID, "upload").click()
    wait(30, lambda: "processed" in text("upload-result"), "the upload is processed")
    check(True, f"upload: {text('upload-result')}")
    wait(10, lambda: len(options("new-model")) > 0, "models are listed")
    for field, value in (("new-epochs", "2"), ("new-lr", "10"), ("new-suffix", "web")):
        find(By.ID, field).clear()
        find(By.ID, field).send_keys(value)
    find(By.ID, "new-skillet").send_keys(
        '{"data": {"max_seq_len": 48, "validation_fraction": 0.2}, "eval": {"generate": false}}'
    )
    shot("new-job.png")
    find(By.ID, "create-job").click()

    # The job page: it finishes, with its curve, checkpoints and report.
    wait(30, lambda: text("job-title").startswith("ftjob-"), "the job page opens")
    shot("job-started.png")
    wait(180, lambda: text("job-status") == "succeeded", "the job succeeds")
    wait(20, lambda: text("report-text").strip() != "", "the report is shown")
    wait(20, lambda: len(driver.find_elements(By.CSS_SELECTOR, "#checkpoints tbody tr")) == 2, "two checkpoints")
    shot("job-finished.png")
    model = text("job-model")
    check(model.startswith("ft:") and model.endswith(text("job-title")), f"fine-tuned model {model}")
    check(len(driver.find_elements(By.CSS_SELECTOR, "#loss-chart polyline.series-train")) == 1, "a training curve")
    check(len(driver.find_elements(By.CSS_SELECTOR, "#loss-chart .series-validation")) == 1, "a validation curve")
    report = text("report-text")
    check("loss" in report.lower(), "the before/after report is shown")
    check(driver.execute_script("return document.getElementById('report-plot').naturalWidth") > 0, "its plot loads")
    wait(10, lambda: "succeeded" in text("jobs") and model in text("jobs"), "the jobs list shows it succeeded")

    # Files with their validation results.
    find(By.CSS_SELECTOR, "nav button[data-tab=files]").click()
    wait(10, lambda: "processed" in text("files"), "files are listed as processed")
    shot("files.png")

    # The playground: base and tuned model side by side.
    find(By.CSS_SELECTOR, "nav button[data-tab=play]").click()
    wait(10, lambda: model in options("play-right"), "the tuned model is offered")
    driver.execute_script(
        "const s = document.getElementById('play-right'); s.value = arguments[0];"
        " s.dispatchEvent(new Event('change'))",
        model,
    )
    find(By.ID, "play-prompt").send_keys("add 3 and 3")
    find(By.ID, "play-send").click()
    content = text
    done = lambda side: content(side) not in ("", "…")  # noqa: E731
    wait(60, lambda: done("play-left-out") and done("play-right-out"), "both models answer")
    shot("playground.png")
    for side in ("play-left-out", "play-right-out"):
        check(not content(side).startswith("error"), f"{side}: {content(side)!r}")
    check(text("msg") == "", f"no error on the page: {text('msg')}")
    print("all checks passed")


if __name__ == "__main__":
    main()
