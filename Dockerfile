# One image for every Blaze Jobs service; docker-compose.yml picks the command.
# On a GPU host, install a CUDA build of torch first (the range in pyproject.toml allows it).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY blaze_jobs blaze_jobs
COPY api api
COPY workers workers
RUN pip install --no-cache-dir .
ENV BLAZE_MODEL_DIR=/models
EXPOSE 8000 5555
CMD ["blaze", "api", "--host", "0.0.0.0", "--port", "8000"]
