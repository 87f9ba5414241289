"""The Celery side of ``bench_peers.py``: one task that returns its input, on Redis.

Imported by the benchmark (to submit) and by ``celery -A peers_celery worker`` (to run); the
broker and result backend come from ``PEERS_REDIS_URL``.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery(
    "peers",
    broker=os.environ["PEERS_REDIS_URL"],
    backend=os.environ["PEERS_REDIS_URL"],
)
app.conf.update(task_acks_late=False, worker_prefetch_multiplier=64, result_expires=600)


@app.task
def echo(value: str) -> str:
    return value
