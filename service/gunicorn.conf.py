"""gunicorn settings for ``moderation serve`` (which passes --bind and --workers).

Each worker loads the model itself, after the fork: forking after torch has started its thread
pools can hang, and a CLIP model is small next to the 24 GiB here.
"""

import os
import shutil
import tempfile

from service.settings import load_settings

# Every MODERATION_* variable, checked once more here (moderation serve already did).
_settings = load_settings()

# gthread workers: each serves `threads` requests at once; torch releases the GIL while it
# computes, so a worker's threads overlap decoding with the model. This subclass reads each
# whole request in the worker's event loop before a thread gets it, so slow or stalled
# clients hold no thread (408 after MODERATION_READ_TIMEOUT_S, 30 s), and answers gunicorn's
# own errors (oversized headers, bad request lines) in the JSON error shape: service/worker.py.
worker_class = "service.worker.BufferingThreadWorker"
# Worker processes (moderation serve --workers): one per core, each with one torch thread,
# measured best on 2 cores (BENCHMARKS.md); each worker holds its own model (~1.5 GB here).
workers = _settings.workers
# Concurrent requests per worker.
threads = _settings.threads
# A worker silent for this long (stuck) is killed and replaced. Loading a large model takes
# a while, so this is generous.
timeout = 120
# On SIGTERM/SIGHUP, workers finish the requests they have for up to this long.
graceful_timeout = 30
# Seconds an idle keep-alive connection stays open (upload pipelines reuse connections).
keepalive = 5
# Never load the app (and torch) in the master: see the module docstring.
preload_app = False
# Access log to stdout: method, path, status, size, time. Never bodies or headers (tokens).
accesslog = "-"
# The path without its query string: the dashboard may carry its token there (?token=).
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
# No peer may set the scheme from a header here (gunicorn believes 127.0.0.1 by default):
# X-Forwarded-Proto is believed only from MODERATION_TRUSTED_PROXIES proxies (ProxyFix).
forwarded_allow_ips = ""
# Request line and header limits (gunicorn's defaults, stated): past them, a JSON 414 or 431.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
# Connections a worker holds at once, requests being read included (gunicorn's default).
worker_connections = 1000

_cores = os.cpu_count() or 1
# State shared by the workers of this server: the count of workers running the model, and
# prometheus_client's multiprocess files. Made fresh for each server. (The active policy is
# in the decision log, shared by every replica.)
_state_dir = tempfile.mkdtemp(prefix="moderation-serve-")
os.environ["MODERATION_STATE_DIR"] = _state_dir
os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(_state_dir, "metrics")
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def on_starting(server):  # type: ignore[no-untyped-def]
    # Migrate the decision log here, in the master, before any worker starts: a long
    # migration (building the search index of millions of stored vectors, migration 0004)
    # would outlast a worker's `timeout` and be killed and retried by each new worker.
    from decisionlog import SchemaError, default_database_url, migrate
    from decisionlog.database import dispose_all

    try:
        before, after = migrate(_settings.database_url or default_database_url())
    except (SchemaError, ValueError) as e:  # said plainly, without a traceback
        server.log.error("cannot use the decision log: %s", e)
        raise SystemExit(1) from e
    finally:
        dispose_all()  # no connection of the master's may reach the forked workers
    if before != after:
        server.log.info("decision log schema: %s -> %s", before or "none", after)


def post_fork(server, worker):  # type: ignore[no-untyped-def]
    # Split the cores between workers so their torch thread pools don't fight.
    os.environ.setdefault("MODERATION_TORCH_THREADS", str(max(1, _cores // server.num_workers)))


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):  # type: ignore[no-untyped-def]
    shutil.rmtree(_state_dir, ignore_errors=True)
