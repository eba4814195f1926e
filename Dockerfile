# janus-bot on a CUDA-enabled PyTorch base. Build: docker build -t janus-bot .
# Run:   docker run --gpus all --stop-timeout 90 --env-file .env -v hf-cache:/cache/huggingface -v ./weights:/app/weights \
#          -v ./data:/app/data janus-bot
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

WORKDIR /app

# Dependencies in their own layer: rebuilt only when pyproject.toml changes (torch comes with the base image).
COPY pyproject.toml README.md ./
RUN mkdir -p bot cogs && touch bot/__init__.py cogs/__init__.py \
    && pip install . \
    && pip uninstall -y janus-bot \
    && rm -rf bot cogs

COPY bot ./bot
COPY cogs ./cogs
RUN pip install --no-deps .

RUN useradd --create-home --uid 10001 janus \
    && mkdir -p /app/weights /app/data /cache/huggingface \
    && chown -R janus:janus /app/weights /app/data /cache
USER 10001:10001

VOLUME ["/cache/huggingface", "/app/weights", "/app/data"]
CMD ["python", "-m", "bot"]
