"""Ray job entry point: the nightly refresh of a run (`hetcomp refresh --ray`), run by the RayCronJob of deploy/.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/nightly_refresh.py --config configs/production.yaml --new-data s3://.../2024-05-01.parquet

--new-data: the day's interactions (with timestamps); without it and before any version, v0001 is built from
the config's data.source. The refresh holds the run's lease, warm-starts the teachers and the student from
the previous version, gates the candidate against production on the newest interactions and, if it passes,
exports it and moves <run>/current (see hetcomp_dist/refresh/job.py).

As the other jobs: the teachers train concurrently, one Ray actor each (their cpus / gpus, ray.max_restarts),
and the student on distill.workers Ray Train workers (ray.max_failures, ray.placement_strategy,
ray.train_storage_path). Inside a job, Ray sets RAY_ADDRESS, so actors and workers go to the job's cluster;
the data version, the gate, the export and the pointer stay in this driver, which holds the lease throughout.
Exit status: 0 promoted, 1 refused by the gate, 2 bad input or config, 3 another refresh or rollback holds the run.
"""

import sys

from hetcomp_dist.cli import run

if __name__ == "__main__":
    run(["refresh", "--ray", *sys.argv[1:]])
