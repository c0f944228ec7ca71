# The lightstudy image, for workers, `create` and the dashboard: `docker run IMAGE <command>`.
#   docker build -t lightstudy .
#   docker run --rm --gpus device=0 -e LIGHTSTUDY_STORAGE=postgresql+psycopg://... \
#       lightstudy worker --study digits_compose
#
# Base: python-slim plus torch's CUDA wheels from PyPI. Those wheels carry the CUDA runtime,
# cuDNN and NCCL (as nvidia-* wheels), so a CUDA base image would only add a second copy; the
# host needs the NVIDIA driver and the NVIDIA Container Toolkit, nothing else. Build arguments:
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (another CUDA) or .../whl/cpu (CPU only,
# a far smaller image). Layers go from the least to the most often changed: torch, lightstudy's
# dependencies (from pyproject.toml alone), then the source.

ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Installed by root, read-only to the user that runs it.
RUN python -m venv /opt/venv \
    && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin lightstudy

# 1. torch and torchvision: the largest layer and the least often changed.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# 2. lightstudy's dependencies (and boto3, for checkpoints in S3), read from pyproject.toml: a
#    change to the source does not reinstall them.
COPY pyproject.toml /tmp/lightstudy/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/lightstudy/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['s3']))" > /tmp/lightstudy/requirements.txt \
    && pip install --no-cache-dir -r /tmp/lightstudy/requirements.txt \
    && rm -rf /tmp/lightstudy

# 3. lightstudy itself (no dependencies left to install).
COPY pyproject.toml README.md /tmp/lightstudy/
COPY src /tmp/lightstudy/src
RUN pip install --no-cache-dir --no-deps /tmp/lightstudy \
    && rm -rf /tmp/lightstudy

# The working directory holds the study files; runs/ (run folders, checkpoints) belongs to the
# user. A named volume mounted there starts as a copy of it, owner included.
WORKDIR /app
COPY studies /app/studies
RUN mkdir /app/runs && chown lightstudy:lightstudy /app/runs

USER lightstudy
ENTRYPOINT ["lightstudy"]
CMD ["--help"]
