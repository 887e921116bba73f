# One image for both halves of a queuejob run on Kubernetes:
#   - the flow run, started by Prefect's kubernetes worker, which sets the container's *args* to
#     `prefect flow-run execute` (its job template never sets `command`);
#   - the worker pods of the Job the flow creates, whose container *command* is
#     `queuejob worker --mode ... -- <your command>`.
# So the image has no ENTRYPOINT: an ENTRYPOINT would be prefixed to Prefect's args (turning them
# into `queuejob prefect flow-run ...`), while a CMD is simply replaced by them. Run on its own,
# the image prints queuejob's help.
#
# There is no init process either: each program runs as PID 1, which ignores any signal it has
# no handler for. `prefect flow-run execute` installs a SIGTERM handler, and `queuejob worker`
# must as well, so that pod deletion and flow-run cancellation reach them.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A fixed, numeric uid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 queuejob \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/queuejob \
        --shell /usr/sbin/nologin queuejob

WORKDIR /opt/queuejob
# Only what the package build reads; .dockerignore keeps everything else out of the context.
COPY pyproject.toml README.md ./
COPY flows ./flows
COPY blocks ./blocks
# A regular (non-editable) install puts the `queuejob` console script in /usr/local/bin, on PATH;
# the build tree is removed so only the installed package remains.
RUN pip install --no-cache-dir . \
    && rm -rf /opt/queuejob/build /opt/queuejob/*.egg-info \
    && queuejob --help >/dev/null

USER 10001:10001
WORKDIR /home/queuejob
ENV HOME=/home/queuejob

CMD ["queuejob", "--help"]
