# Lines for .ci/run (issue 23), before the README's test command: the browser test tests/api/test_page.py needs
# headless Chromium and its driver, and under CI=true it fails (never skips) when they are missing. Idempotent:
# installs only what is missing. Selenium comes with the `test` extra (pyproject.toml).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi
