# gridtune: one image for workers, Flower, the producer CLI and the local API.
# No secrets here: OPENAI_API_KEY and the rest come from the environment at run time.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gridtune ./gridtune
COPY worker ./worker
COPY producer ./producer
COPY models ./models
COPY localapi ./localapi
COPY sweeps ./sweeps
RUN pip install . \
    && useradd --create-home --uid 10001 gridtune \
    && mkdir -p /data \
    && chown gridtune:gridtune /data

USER gridtune
ENV GRIDTUNE_DATA_DIR=/data
VOLUME ["/data"]
# Workers by default; compose sets the command of every service.
CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO"]
