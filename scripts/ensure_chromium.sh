#!/usr/bin/env bash
# Make Debian's headless-capable chromium available for the report rendering test.
# Idempotent: does nothing when /usr/bin/chromium exists. Never fails the build: when it cannot
# install (no root, no apt, offline) it says why and exits 0, and the report test then skips.
set -u
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    echo "ensure_chromium: $CHROMIUM present"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: apt-get not found; chromium not installed (the report render test will skip)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure_chromium: not root and no passwordless sudo; chromium not installed (the report render test will skip)"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq >/dev/null 2>&1; then
    echo "ensure_chromium: apt-get update failed (offline?); trying the cached package lists"
fi
if $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1 \
   && [ -x "$CHROMIUM" ]; then
    echo "ensure_chromium: installed $($CHROMIUM --version 2>/dev/null || echo chromium)"
else
    echo "ensure_chromium: apt-get install chromium failed; the report render test will skip"
fi
exit 0
