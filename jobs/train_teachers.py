"""Ray job entry point: train the run's teachers, one actor each (the flags of `hetcomp train-teachers`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_teachers.py --config configs/tiny.yaml --set run=s3://bucket/runs/tiny

Inside a job, Ray sets RAY_ADDRESS, so the actors go to the job's cluster.
"""

import sys

from hetcomp_dist.cli import run

if __name__ == "__main__":
    run(["train-teachers", *sys.argv[1:]])
