#!/usr/bin/env bash
# Serve the AutoGLM function with uvicorn: the same app, config and engine as `func deploy` images, without Knative.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/run_autoglm_server.sh [uvicorn options...]

Serves the OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, /health, /metrics) with uvicorn
on http://$HOST:$PORT. The model loads in the background after startup; GET /health/readiness turns 200 when
it is ready. With MODEL_PATH unset, the embedded tiny random-weight model is built into MODEL_CACHE_DIR once.

Environment:
  HOST     interface to bind (default 0.0.0.0)
  PORT     port to listen on (default 8000)
  PYTHON   interpreter to use (default: the repository's .venv if present, else python3)
  Every setting of the function (MODEL_PATH, QUANTIZATION, MAX_NUM_SEQS, ...) is read from the environment too;
  see the README's configuration table.

Extra arguments are passed to uvicorn, e.g. --log-level debug.
USAGE
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi

# uvicorn's h11 with func-python's header limits (16 KiB, 5 s): function/uvicorn_http.py, docs/security.md
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m function.uvicorn_http --factory function.func:create_app --app-dir "$root" --http h11-bounded \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@"
