"""Ray job entry point: distil the run's teachers into a student on Ray Train (`hetcomp distill --ray`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/distill.py --config configs/citeulike.yaml --set distill.workers=2

Inside a job, Ray sets RAY_ADDRESS, so the TorchTrainer's workers go to the job's cluster. Worker
count and resources: distill.workers, distill.cpus_per_worker, distill.gpus_per_worker; restarts
after a worker failure: ray.max_restarts (each resumes from <out>/checkpoint).
"""

import sys

from hetcomp_dist.cli import run

if __name__ == "__main__":
    run(["distill", "--ray", *sys.argv[1:]])
