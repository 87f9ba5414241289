FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contracts contracts
COPY runtime runtime
RUN pip install --no-cache-dir .
ENTRYPOINT ["jetrun"]
