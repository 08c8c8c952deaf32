# AutoGLM-Phone-9B as a Knative function: CUDA runtime + torch + transformers + bitsandbytes (+ flash-attn if a
# matching prebuilt wheel is given), served by func-python (hypercorn) on port 8080.
#
#   docker build -t registry.example.com/autoglm/autoglm-phone-9b:0.1.0 .
#   docker build --build-arg FLASH_ATTN_WHEEL=<url of a wheel for this torch/CUDA/Python/cxx11abi> ...
#
# Layers go from the slowest-changing to the fastest: OS packages, torch with its CUDA libraries (~4.1 GB to pull,
# ~7.2 GB on disk), the project's dependencies (read from pyproject.toml alone), then the project's code. Editing
# function/ rebuilds only the last, small layers. What each layer weighs, and so what a cold start on a fresh node
# pulls: docs/image.md (k8s/prepull.yaml takes that pull out of the cold start).
# The model weights are not in the image: they live on the model cache volume (see service.yaml and
# k8s/prequantize-job.yaml), so the image stays the same across checkpoints and quantization settings.

# The torch wheels bring their own CUDA libraries (cuBLAS, cuDNN, NCCL, nvrtc, ... as nvidia-* wheels, loaded from
# the venv), so the base is CUDA's "base" flavour: Ubuntu, cudart and the NVIDIA container-toolkit environment
# (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES). The "runtime" flavour would add a second copy of those
# libraries, ~1.9 GB compressed that nothing loads (docs/image.md). The driver comes from the node; CUDA 12.x wheels
# run on a driver >= 525 (minor-version compatibility).
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# Python 3.12 (Ubuntu 24.04's). gcc and the Python headers are needed at run time by Triton, which compiles a small
# launcher for every kernel that torch.compile/inductor generates (~240 MB with their dependencies; the launchers are
# cached on the volume, TRITON_CACHE_DIR, but the first start on a fresh volume builds them). No apt cache, no pip
# cache, no test extras: the image holds what serving and the pre-quantize Job run.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv "$VIRTUAL_ENV" && pip install --upgrade pip

# torch first, alone: the biggest layer and the one that changes least. The default index's Linux x86_64 wheels are
# CUDA builds; TORCH_INDEX_URL selects a specific one (e.g. https://download.pytorch.org/whl/cu126).
# torchvision with it (pip picks the build that matches torch): transformers' torchvision image processor
# prepares a 1080x2400 screenshot in ~0.04 s where its PIL backend takes ~0.3 s (function/engine/loader.py).
ARG TORCH_SPEC="torch>=2.4"
ARG TORCH_INDEX_URL=""
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" torchvision

WORKDIR /app
# The project's dependencies (transformers, bitsandbytes via the gpu extra, func-python, ...) from pyproject.toml
# alone, so that code changes do not invalidate this layer. torch is already satisfied.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# flash-attn is optional. Source builds take an hour and need nvcc, so only a prebuilt wheel matching torch, CUDA,
# Python and the C++ ABI is installed. Without it (or if it fails to import) ATTN_IMPLEMENTATION=auto uses sdpa.
ARG FLASH_ATTN_WHEEL=""
RUN if [ -n "$FLASH_ATTN_WHEEL" ]; then \
      pip install --no-deps "$FLASH_ATTN_WHEEL" || echo "WARNING: flash-attn wheel not installed; sdpa will be used" >&2; \
    fi; \
    python -c "import flash_attn" 2>/dev/null && echo "flash-attn available" || echo "flash-attn absent: attention falls back to sdpa"

# The project itself: the function package, then the one script the pre-quantize Job runs.
COPY function ./function
# The server imports /app/function (the working directory comes first on sys.path); PYTHONDONTWRITEBYTECODE and a
# read-only /app for uid 10001 mean its bytecode is never cached at run time, so it is compiled here, once.
RUN pip install --no-deps . \
 && python -m compileall -q function \
 && python -c "import func_python.http, function.config"
COPY scripts/prequantize.py ./scripts/prequantize.py

# Non-root user; uid/gid 10001 is what service.yaml's securityContext and the Job's fsGroup use.
# /models is where the model cache volume is mounted; the directories exist so the image also runs without it.
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid 10001 --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /models/cache /models/hf \
 && chown -R 10001:10001 /models

# Caches on the volume; offline at run time (the Job downloads the checkpoint); func-python's listen addresses.
# MALLOC_MMAP_THRESHOLD_: every allocation of 1 MiB or more (a request body, decoded screenshot, processor arrays,
# pixel tensors) is its own mmap and goes back to the OS when freed. glibc's default raises the threshold to 32 MiB
# after the first such free, so these buffers land in per-thread arenas that keep them: the server's RSS climbed
# 1.65 -> 5.5 GB over a soak on the H200 and stayed there; with the fixed threshold it stays flat at rest (CPU probe:
# 514 MB vs 1.26-1.53 GB, same throughput; bench/RESULTS.md, session 6).
ENV HOME=/home/app \
    MALLOC_MMAP_THRESHOLD_=1048576 \
    MODEL_CACHE_DIR=/models/cache \
    HF_HOME=/models/cache/hf \
    HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/models/cache/torchinductor \
    TRITON_CACHE_DIR=/models/cache/triton \
    LISTEN_ADDRESS="[::]:8080,0.0.0.0:8080"

USER 10001:10001
EXPOSE 8080
# func-python's server: binds LISTEN_ADDRESS, answers /health/liveness and /health/readiness itself, calls the
# function instance's start() with the environment, and hands every other request to its handle().
ENTRYPOINT ["python", "-c", "from func_python.http import serve; from function import new; serve(new)"]
