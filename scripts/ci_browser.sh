#!/usr/bin/env bash
# CI: the playground test needs a real headless Chromium and its driver (Debian's packages;
# Selenium is pointed at them, nothing is downloaded by Selenium itself). Installs them with
# apt where they are missing and we may; a CJK font makes the screenshot legible.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q chromium chromium-driver fonts-ipafont-gothic >/dev/null
command -v chromium && command -v chromedriver
