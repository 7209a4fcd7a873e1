"""Compare NAS, NAS + refine, the baselines and the dense model on the test split:
`nas-prune compare` as a Ray job.

Submit it to a running cluster from the repository root::

    ray job submit --working-dir . -- python jobs/compare.py --out /mnt/shared/nas --baselines '[pins, grain]' --compare.budgets '[0.58, 0.63, 0.77]'

Every option of `nas-prune compare --help` works here; on a cluster, put output directories on
shared storage (a shared filesystem, see README) so every node reads and writes the same files.
"""

import sys
from pathlib import Path

# the uploaded working dir, and not jobs/ itself, which Python puts first for a script:
# jobs/profile.py would shadow the standard library's `profile` (imported by cProfile -> torch)
_JOBS = Path(__file__).resolve().parent
sys.path[:] = [str(_JOBS.parent), *(p for p in sys.path if Path(p or ".").resolve() != _JOBS)]

from nas_prune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
