# syntax=docker/dockerfile:1
# The detection service. CPU PyTorch by default:
#   docker build -t detect .
#   docker run -p 8000:8000 -e DETECT_API_KEY="$(openssl rand -hex 32)" detect
# The container listens on 0.0.0.0: without DETECT_API_KEY anyone who reaches the port can use it, and `detect
# serve` logs a warning saying so (`--insecure` in the command silences it, for a service that is open on purpose).
# GPU: CUDA wheels, which carry the CUDA runtime (the host driver comes in with --gpus all):
#   docker build -t detect:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker run --gpus all -e DETECT_DEVICE=cuda -p 8000:8000 detect:gpu
# Ray (detect predict --engine ray, detect serve --engine ray, the KubeRay manifests in deploy/k8s/ray): add extras,
#   docker build -t detect:ray --build-arg EXTRAS="[ray,s3]" .
# PYTHON_IMAGE may name another base (a CUDA image with Python 3.11 at /usr/local/bin); both stages use it, so the
# virtualenv built in the first runs in the second.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Torch first, from the index that matches the base: the largest layer, rebuilt only when the index changes.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.2,<3" "torchvision>=0.17,<1"
COPY pyproject.toml README.md ./
COPY detect ./detect
COPY proposals ./proposals
COPY api ./api
# The project itself, with EXTRAS (e.g. "[ray]"); its dependencies' bounds are in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".${EXTRAS}"

FROM ${PYTHON_IMAGE} AS runtime
ARG EXTRAS=""
# Ray images get HAProxy: Ray Serve then routes requests straight to the replicas (api/ray_serve.py, "Ingress").
# hadolint ignore=DL3008
RUN case "$EXTRAS" in \
      *ray*) apt-get update && apt-get install -y --no-install-recommends haproxy && rm -rf /var/lib/apt/lists/* ;; \
    esac
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DETECT_DEVICE=cpu \
    DETECT_WEIGHTS_DIR=/opt/detect/weights
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin detect
COPY --from=build /opt/venv /opt/venv
# The installed package has no weights/ beside it: DETECT_WEIGHTS_DIR puts the bundled ones on the search path, and
# with DETECT_MODELS unset every registered <family>_shapes model is served.
COPY --chown=root:root weights /opt/detect/weights
WORKDIR /home/detect
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["detect", "serve", "--host", "0.0.0.0", "--port", "8000"]
