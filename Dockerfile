# syntax=docker/dockerfile:1
# One image for the operator, the trainer and the inference server: `finetune <command>`.
#
#   docker build -t finetune:dev .
#   docker run --rm finetune:dev --help
#   docker run --rm --gpus all -v $PWD/work:/workspace finetune:dev train -f /workspace/job.yaml --output /workspace/out
#
# The CUDA-enabled PyTorch comes from the base image; the build stage installs the project and its other
# dependencies into a virtualenv that sees the base image's torch (--system-site-packages), and the final
# stage copies only that virtualenv: no compiler, pip cache or source tree in the image.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv --system-site-packages /opt/finetune
WORKDIR /src
COPY pyproject.toml README.md ./
COPY finetune/ finetune/
COPY operator/ operator/
COPY trainer/ trainer/
COPY server/ server/
# A regular (non-editable) install: the image must not depend on /src.
RUN /opt/finetune/bin/pip install --no-cache-dir . \
    && /opt/finetune/bin/finetune --help >/dev/null

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="finetune" \
      org.opencontainers.image.description="FineTuneJob operator, trainer and inference server" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 1000 match the chart's runAsUser/fsGroup; /cache and /workspace are the writable volumes.
RUN groupadd --gid 1000 finetune \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/finetune --shell /usr/sbin/nologin finetune \
    && mkdir -p /cache /workspace \
    && chown finetune:finetune /cache /workspace
COPY --from=build --chown=root:root /opt/finetune /opt/finetune
# HF_HOME: hub downloads and dataset caches go to the /cache volume (the root filesystem is read-only
# in the cluster); the operator mounts an emptyDir or a PVC there.
ENV PATH=/opt/finetune/bin:$PATH \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/cache"]
WORKDIR /workspace
USER 1000:1000
# 8080: inference server and operator metrics.
EXPOSE 8080
ENTRYPOINT ["finetune"]
CMD ["--help"]
