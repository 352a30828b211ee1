# The Hutch image: one entry point, `hutch`; the compose file passes the subcommand.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package needs (README.md is the package's readme in pyproject.toml).
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY topology ./topology
RUN pip install . && rm -rf /src/build

# Run as an unprivileged user; the config is mounted read-only at /etc/hutch/hutch.toml.
RUN useradd --system --uid 10001 --no-create-home hutch
USER hutch
WORKDIR /
ENTRYPOINT ["hutch"]
CMD ["--help"]
