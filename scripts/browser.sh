#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the browser test (tests/stack/test_browser.py).
# Usage: bash scripts/browser.sh install    (Debian/Ubuntu; needs root or sudo)
set -euo pipefail

install_browser() {
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        return 0
    fi
    local sudo=()
    [[ $EUID -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >/dev/null
}

case "${1:-}" in
    install) install_browser ;;
    *) echo "usage: $0 install" >&2; exit 2 ;;
esac
