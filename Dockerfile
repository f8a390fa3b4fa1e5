# One image for every Blaze Jobs service; docker-compose.yml picks the command.
# On a GPU host, install a CUDA build of torch first (the range in pyproject.toml allows it).
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY blaze_jobs blaze_jobs
COPY api api
COPY workers workers
RUN pip install --no-cache-dir .
# Run outside the source tree: with python -m the working directory comes first on sys.path,
# and blaze_jobs/ there (without api/ and workers/) would shadow the installed package.
WORKDIR /app
ENV BLAZE_MODEL_DIR=/models
EXPOSE 8000 5555
CMD ["blaze", "api", "--host", "0.0.0.0", "--port", "8000"]
