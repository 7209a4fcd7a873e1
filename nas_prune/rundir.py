"""The output directory of a run: the one place that knows where each stage writes.

```
OUT/teacher/            fine-tuned dense model (checkpoint)           pipeline.finetune
OUT/supernet/           weight-sharing supernet (checkpoint)          pipeline.supernet
OUT/tune/               Ray Tune experiment state (resume)            pipeline.search
OUT/results/            Parquet results: evaluations/ and latency/    pipeline.search, profile,
                                                                      baselines
OUT/baselines/<method>/ one model dir per baseline model              pipeline.baselines
OUT/report/             pareto.png, summary.md                        pipeline.report
OUT/export/<name>/      one Hugging Face model dir per sub-network    pipeline.refine (refined),
                        (refined when refine ran)                     pipeline.export
OUT/compare/            comparison.md/.csv/.json/.png on the test     pipeline.compare
                        split, test_scores.parquet (per example)
OUT/compare/nas/<name>/ the unrefined Pareto models it scores         pipeline.compare
OUT/summary.json        what `nas-prune run` did, stage by stage      pipeline.run
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nas_prune.errors import OptionsError


@dataclass(frozen=True)
class RunDir:
    """The layout of one output directory (`--out`)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise OptionsError(f"--out {root} is a file, not a directory; choose a directory")
        object.__setattr__(self, "root", root)

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def supernet(self) -> Path:
        return self.root / "supernet"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def baseline(self, method: str) -> Path:
        return self.root / "baselines" / method

    @property
    def report(self) -> Path:
        return self.root / "report"

    def export(self, name: str) -> Path:
        return self.root / "export" / name

    @property
    def compare(self) -> Path:
        return self.root / "compare"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"
