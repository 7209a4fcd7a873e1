"""The errors a user can cause, one type per room, all `NasPruneError`s.

Each says what is wrong and what to change; the CLI prints it as one line and exits with status 2
(no traceback). Torch-free, so option validation raises them before anything heavy is imported.
"""

from __future__ import annotations


class NasPruneError(ValueError):
    """Bad input: options, data, checkpoints or results that nas_prune cannot use as given."""


class OptionsError(NasPruneError):
    """An option value (or a combination of options) that no stage can run with."""


class DataError(NasPruneError):
    """Bad task name, data file, column, label or split setting; the message says what to fix."""


class CheckpointError(NasPruneError):
    """A checkpoint directory that is missing, damaged, or of another kind than needed."""


class TrainingError(NasPruneError):
    """Training cannot start as asked (bad strategy, DeepSpeed config, teacher, checkpoint)."""


class SearchError(NasPruneError):
    """A search that cannot start as configured; raised before any trial runs."""


class SearchSpaceError(NasPruneError):
    """A search space that cannot be built (bounds empty, inverted or outside the model)."""


class ProfileError(NasPruneError):
    """Latency cannot be measured as asked (unknown hardware type, bad settings)."""


class ResultsError(NasPruneError):
    """A row that does not fit the schema, or a bad store path/name; the message says what."""


class BaselineError(NasPruneError):
    """A baseline cannot run as asked (unknown method, bad option, teacher mismatch)."""
