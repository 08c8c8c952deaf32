#!/usr/bin/env bash
# Set up a CPU development environment in .venv: the CPU build of torch first (an unpinned torch would pull a
# multi-GB CUDA build), then the project with its test tools. GPU images use the Dockerfile instead.
set -euo pipefail

case "${1:-}" in
  -h|--help)
    echo "Usage: scripts/setup.sh    creates .venv with torch==2.13.0 (CPU) and the project installed (editable, [test])"
    exit 0 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
