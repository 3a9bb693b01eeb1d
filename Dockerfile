# One image for the Ray nodes, the MLflow server and the fmc CLI: GPU TensorFlow (CUDA as wheels; the
# host needs only the NVIDIA driver and container toolkit), the package, the dataset.
# FMC_VARIANT=cpu (a build argument; docker-compose.yml passes it from .env) leaves the CUDA wheels out.
FROM python:3.11-slim-bookworm

ARG FMC_VARIANT=gpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_LINK_MODE=copy \
    KERAS_BACKEND=tensorflow \
    TF_CPP_MIN_LOG_LEVEL=2

RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --user-group fmc \
 && mkdir -p /var/lib/fmc/mlflow-artifacts /var/lib/fmc/ray_results /tmp/ray \
 && chown -R fmc:fmc /var/lib/fmc /tmp/ray

WORKDIR /opt/fmc
# The README's set-up, as on any machine: Debian's dataset-fashion-mnist, uv, `uv sync --frozen` from
# uv.lock, here without the test tools. The dependencies come first, in a layer that only uv.lock
# changes: a change to fmc's code rebuilds the last two layers only.
COPY pyproject.toml uv.lock Makefile README.md ./
RUN case "$FMC_VARIANT" in gpu) extra="--extra gpu" ;; cpu) extra="" ;; \
      *) echo "FMC_VARIANT is gpu or cpu, not '$FMC_VARIANT'" >&2; exit 2 ;; esac \
 && make setup UV_SYNC_FLAGS="--no-dev --no-install-project $extra" \
 && rm -rf /var/lib/apt/lists/* /root/.cache

COPY fmnist_cluster ./fmnist_cluster
COPY tracking ./tracking
COPY sweeps ./sweeps
# fmc itself (--inexact: the extras installed above stay); the environment stays root's (read-only to
# the services), the work folder is fmc's
RUN python3 -m uv sync --frozen --no-dev --inexact \
 && rm -rf /root/.cache \
 && chown fmc:fmc /opt/fmc
ENV PATH=/opt/fmc/.venv/bin:$PATH \
    FMC_STORAGE_PATH=/var/lib/fmc/ray_results
USER fmc

ENTRYPOINT ["fmc"]
CMD ["--help"]
