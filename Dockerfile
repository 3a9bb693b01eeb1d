# syntax=docker/dockerfile:1
# One image for the Ray nodes, the MLflow server and the fmc CLI: GPU TensorFlow (CUDA as wheels; the
# host needs only the NVIDIA driver and container toolkit), the package, the dataset.
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_LINK_MODE=copy \
    KERAS_BACKEND=tensorflow \
    TF_CPP_MIN_LOG_LEVEL=2

RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fmc
COPY pyproject.toml uv.lock Makefile README.md ./
COPY fmnist_cluster ./fmnist_cluster
COPY tracking ./tracking
COPY sweeps ./sweeps

# The README's set-up, as on any machine: Debian's dataset-fashion-mnist, uv, `uv sync --frozen` from
# uv.lock; here without the test tools and with the GPU extra.
RUN make setup UV_SYNC_FLAGS="--no-dev --extra gpu" \
 && rm -rf /var/lib/apt/lists/* /root/.cache

RUN useradd --create-home --uid 1000 --user-group fmc \
 && mkdir -p /var/lib/fmc/mlflow-artifacts /var/lib/fmc/ray_results \
 && chown -R fmc:fmc /var/lib/fmc /opt/fmc
ENV PATH=/opt/fmc/.venv/bin:$PATH \
    FMC_STORAGE_PATH=/var/lib/fmc/ray_results
USER fmc

ENTRYPOINT ["fmc"]
CMD ["--help"]
