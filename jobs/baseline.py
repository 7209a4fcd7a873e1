"""Run a published pruning method on the teacher: `nas-prune baseline <method>` as a Ray job.

Submit it to a running cluster from the repository root::

    ray job submit --working-dir . -- python jobs/baseline.py pins --out /mnt/shared/nas --pins.sparsities '[0.5, 0.8]'

Methods: pins, grain, layer_drop (`nas-prune baseline --help`); every option of
`nas-prune baseline <method> --help` works here. Models go to OUT/baselines/<method>/, rows to
OUT/results; on a cluster, put OUT on shared storage (see README).
"""

import sys
from pathlib import Path

# the uploaded working dir, and not jobs/ itself, which Python puts first for a script:
# jobs/profile.py would shadow the standard library's `profile` (imported by cProfile -> torch)
_JOBS = Path(__file__).resolve().parent
sys.path[:] = [str(_JOBS.parent), *(p for p in sys.path if Path(p or ".").resolve() != _JOBS)]

from nas_prune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["baseline", *sys.argv[1:]]))
