"""The jobs a head can run on a ready ring, by the names the rank protocol gives them.

Each job is `job(engine, model_dir, options)`: it drives the head's engine and
prints its results on stdout (the launcher relays or captures them).
"""

from __future__ import annotations

from collections.abc import Callable

from mlxring.cluster.protocol import JOBS as JOB_NAMES
from mlxring.engine.engine import Engine
from mlxring.jobs.prompt import generate
from mlxring.jobs.workload import batch, bench
from mlxring.server.serve import serve

Job = Callable[[Engine, str, dict], None]
JOBS: dict[str, Job] = {"generate": generate, "serve": serve, "batch": batch, "bench": bench}
assert set(JOBS) == set(JOB_NAMES), "mlxring.cluster.protocol.JOBS names every job"
