"""Export the Pareto-optimal sub-networks as Hugging Face models: `nas-prune export` as a Ray job.

Submit it to a running cluster from the repository root::

    ray job submit --working-dir . -- python jobs/export.py --supernet /mnt/shared/nas/supernet --results /mnt/shared/nas/results --out /mnt/shared/nas/export

Every option of `nas-prune export --help` works here; on a cluster, put output directories on
shared storage (a shared filesystem, see README) so every node reads and writes the same files.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from nas_prune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
