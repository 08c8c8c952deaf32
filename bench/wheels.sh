#!/usr/bin/env bash
# Downloads into .whl/ (gitignored) the x86-64 CPython 3.12 wheels that the H200 device image lacks, so that the
# real server (func-python + hypercorn + FastAPI) and nf4 (bitsandbytes) run there. The image already has torch,
# transformers, numpy, pillow, httpx, anyio, h11, uvloop, prometheus-client, safetensors, tokenizers, accelerate,
# scipy, pyyaml, requests, packaging, python-dateutil, psutil and annotated-doc; nothing here replaces those.
#
#   bench/wheels.sh            # then, on the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Versions are the ones the project's CPU venv runs its tests with (one version of each package).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
mkdir -p "$DEST"

PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(
  # the function's web stack
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0   # pydantic 2.14 needs typing-extensions >= 4.16
  opentelemetry-api==1.45.2                            # fastapi 0.165 imports it at import time
  # func-python and its server
  func-python==0.8.1 hypercorn==0.17.3 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0 priority==2.0.0 wsproto==1.3.2
  cloudevents==2.2.0 deprecation==2.1.0
  # the response cache's client, uvicorn for scripts/run_autoglm_server.sh
  redis==8.1.0 uvicorn==0.54.0
)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "$@" -d "$DEST"; }
dl "${PLAT[@]}" "${WHEELS[@]}"
dl --platform manylinux_2_24_x86_64 "${PLAT[@]}" bitsandbytes==0.50.2

# one version of each package: two wheels of one name stop the whole install on the device
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
  echo "more than one version of: $dups (remove the old wheels from $DEST)" >&2
  exit 1
fi
du -ch "$DEST"/*.whl | tail -1
