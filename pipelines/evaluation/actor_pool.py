"""Rows through a model held in a pool of Ray Data actors: the one batch-inference plumbing every
task's evaluation uses (each actor loads its model once)."""

from __future__ import annotations

import ray

from pipelines.job_config import EvalConfig


def map_with_actor_pool(table, predictor: type, args: tuple, e: EvalConfig) -> list[dict]:
    """Rows through `predictor(*args)` held in `e.actors` Ray Data actors (each loads its model
    once), `e.batch_size` rows per call, the GPU share Ray reserves per actor; results on the driver."""
    size = max(1, e.batch_size * 4)
    ds = ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)])
    resources = {"num_cpus": e.cpus_per_actor, **({"num_gpus": e.gpus_per_actor} if e.gpus_per_actor else {})}
    return ds.map_batches(
        predictor,
        fn_constructor_args=args,
        batch_size=e.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=e.actors),
        **resources,
    ).take_all()
