"""Pareto fronts, multi-objective ranks and hypervolume; every objective is MINIMISED.

Callers flip the sign of an objective they want to maximise. Points are arrays of shape
``(n_points, n_objectives)``.

- Non-dominated sorting peels Pareto fronts; inside a front the *epsilon-net* (farthest-point)
  order of MO-ASHA (Schmucker, Donini, Zafar, Salinas, Archambeau: "Multi-objective asynchronous
  successive halving", arXiv 2106.12639) puts well-spread points first. `rank` turns that ordering
  into one rank per point. The reference implementation (syne-tune) reads the *ordering* as ranks,
  which can stop a trial that dominates every other; here ``ranks[order] = arange(n)``. It also
  seeds the spread at the point best in the first objective, so when fewer points may continue
  than a front holds, that end of the front always wins; here the spread starts at the front's
  compromise point (nearest the ideal point), which no objective order favours.
- Hypervolume: an exact sweep for two objectives, `moocore` for three or more.
- Normalisation: min-max bounds (`Normaliser`, recorded with results through ``to_dict``) or the
  quantile transform over all runs of a task with reference point (2, 2) that Klein et al.
  (TMLR 2024, arXiv 2405.02267) use to compare searches by hypervolume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import moocore
import numpy as np
from numpy.typing import ArrayLike

RANK_METHODS = ("epsilon_net", "nondominated")

MODES = ("min", "max")
"""Objective modes; everything in this package minimises after `mode_signs`."""


def mode_signs(modes: Sequence[str] | str | None, count: int) -> np.ndarray:
    """+1 for each minimised and -1 for each maximised objective of `count` (one mode for all
    when `modes` is a string, all minimised when None): multiply objective vectors by it once
    and minimise everything after.

    Raises:
        ValueError: The number of modes differs from `count`, or a mode is not min/max.
    """
    if modes is None:
        modes = "min"
    modes = [modes] * count if isinstance(modes, str) else list(modes)
    if len(modes) != count:
        raise ValueError(f"got {len(modes)} modes {modes} for {count} objectives; give one "
                         "mode per objective or a single mode for all")
    if bad := [m for m in modes if m not in MODES]:
        raise ValueError(f"modes must be 'min' or 'max', got {bad}")
    return np.array([1.0 if m == "min" else -1.0 for m in modes])
"""Orders inside a front: farthest-point spread, or input order (earlier rows first)."""

DEFAULT_REFERENCE = 1.1
"""Reference value per objective for hypervolumes of min-max normalised points (`Normaliser`):
slightly beyond the worst observed value 1.0, so the extreme points of a front still count."""

QUANTILE_REFERENCE = 2.0
"""Reference value per objective after `quantile_normalise` (Klein et al.: point (2, 2))."""


def _as_points(points: ArrayLike) -> np.ndarray:
    array = np.asarray(points, dtype=float)
    if array.ndim == 1 and array.size == 0:
        return array.reshape(0, 0)
    if array.ndim != 2:
        raise ValueError(f"points must have shape (n_points, n_objectives), got {array.shape}")
    return array


def non_dominated_sort(points: ArrayLike) -> list[np.ndarray]:
    """Peels Pareto fronts off a set of points.

    Point ``p`` dominates ``q`` if it is no worse in every objective and better in one. Equal
    points do not dominate each other, so duplicates share a front. ``+inf`` and ``-inf`` compare
    as ordinary values; rows containing NaN cannot be compared and form one final front of their
    own. Cost: O(n^2) time and memory per call.

    Args:
        points: Array of shape ``(n_points, n_objectives)``.

    Returns:
        Index arrays, front 0 (the non-dominated points) first, each sorted ascending.
    """
    pts = _as_points(points)
    has_nan = np.isnan(pts).any(axis=1)
    index = np.flatnonzero(~has_nan)
    comparable = pts[index]
    n = len(index)
    no_worse = np.ones((n, n), dtype=bool)
    better_once = np.zeros((n, n), dtype=bool)
    for column in comparable.T:
        no_worse &= column[:, None] <= column[None, :]
        better_once |= column[:, None] < column[None, :]
    dominates = no_worse & better_once  # dominates[i, j]: point i dominates point j
    num_dominators = dominates.sum(axis=0)
    remaining = np.ones(n, dtype=bool)
    fronts = []
    while remaining.any():
        front = remaining & (num_dominators == 0)
        fronts.append(index[front])
        remaining &= ~front
        num_dominators -= dominates[front].sum(axis=0)
    if has_nan.any():
        fronts.append(np.flatnonzero(has_nan))
    return fronts


def pareto_mask(points: ArrayLike) -> np.ndarray:
    """Marks the non-dominated points (front 0); rows with NaN are never marked.

    Args:
        points: Array of shape ``(n_points, n_objectives)``.

    Returns:
        Boolean array of shape ``(n_points,)``.
    """
    pts = _as_points(points)
    mask = np.zeros(len(pts), dtype=bool)
    fronts = non_dominated_sort(pts)
    if fronts:
        mask[fronts[0]] = True
    return mask & ~np.isnan(pts).any(axis=1)


def epsilon_net_order(points: ArrayLike) -> np.ndarray:
    """Orders points by farthest-point spread (the epsilon-net of MO-ASHA).

    Each objective is min-max normalised to [0, 1] over the given points (an objective with a
    single value is left at 0); ``+inf`` then maps to 2, ``-inf`` to -1 and NaN to 2. The order
    starts from the *compromise* point: the one nearest (Euclidean) to the ideal point, the
    per-objective minimum of the normalised points (ties: the lower index). It then repeatedly
    appends the point farthest from all points chosen so far (ties: the lower index), so the
    extremes of a front come next. Neither end of a front is favoured: permuting the
    objectives gives the same order. Meant for the points of one front.

    Args:
        points: Array of shape ``(n_points, n_objectives)``.

    Returns:
        A permutation of ``arange(n_points)``, best-spread first.
    """
    pts = _as_points(points)
    n = len(pts)
    if n <= 1:
        return np.arange(n)
    finite = np.isfinite(pts)
    lower = np.where(finite, pts, np.inf).min(axis=0)
    upper = np.where(finite, pts, -np.inf).max(axis=0)
    span = upper - lower
    lower = np.where(np.isfinite(lower), lower, 0.0)
    span = np.where(np.isfinite(span) & (span > 0), span, 1.0)
    scaled = np.nan_to_num((pts - lower) / span, nan=2.0, posinf=2.0, neginf=-1.0)

    first = int(np.argmin(np.linalg.norm(scaled - scaled.min(axis=0), axis=1)))
    order = [first]
    chosen = np.zeros(n, dtype=bool)
    chosen[first] = True
    distance = np.linalg.norm(scaled - scaled[first], axis=1)
    for _ in range(n - 1):
        candidate = int(np.argmax(np.where(chosen, -1.0, distance)))
        order.append(candidate)
        chosen[candidate] = True
        distance = np.minimum(distance, np.linalg.norm(scaled - scaled[candidate], axis=1))
    return np.asarray(order)


def sort_order(points: ArrayLike, method: str = "epsilon_net") -> np.ndarray:
    """Orders all points best first: fronts in order, and inside each front by ``method``.

    Args:
        points: Array of shape ``(n_points, n_objectives)``.
        method: ``"epsilon_net"`` (farthest-point spread inside a front) or ``"nondominated"``
            (input order inside a front, earlier rows first). The final front of rows with NaN
            always keeps input order.

    Returns:
        Indices of the points, best first. This is an ORDERING, not a rank per point: use `rank`.
    """
    if method not in RANK_METHODS:
        raise ValueError(f"unknown rank method {method!r}; choose one of {RANK_METHODS}")
    pts = _as_points(points)
    parts = []
    for front in non_dominated_sort(pts):
        comparable = not np.isnan(pts[front]).any()
        if method == "epsilon_net" and comparable:
            front = front[epsilon_net_order(pts[front])]
        parts.append(front)
    return np.concatenate(parts) if parts else np.arange(0)


def rank(points: ArrayLike, method: str = "epsilon_net") -> np.ndarray:
    """Gives every point its rank (0 = best): its position in `sort_order`.

    Args:
        points: Array of shape ``(n_points, n_objectives)``.
        method: ``"epsilon_net"`` or ``"nondominated"``, see `sort_order`.

    Returns:
        Integer array of shape ``(n_points,)``: ``ranks[i]`` is the rank of point ``i``.
    """
    order = sort_order(points, method)
    ranks = np.empty(len(order), dtype=int)
    ranks[order] = np.arange(len(order))
    return ranks


def hypervolume(points: ArrayLike, reference: ArrayLike) -> float:
    """Hypervolume dominated by ``points`` and bounded by ``reference`` (all minimised).

    Points not strictly better than the reference in every objective, and rows with NaN,
    contribute nothing. Two objectives use an exact sweep; three or more use
    `moocore.hypervolume`.

    Args:
        points: Array of shape ``(n_points, n_objectives)``.
        reference: The reference point, shape ``(n_objectives,)``.

    Returns:
        The hypervolume (0.0 for an empty set).
    """
    pts = _as_points(points)
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if pts.size and pts.shape[1] != ref.size:
        raise ValueError(f"reference has {ref.size} objectives, the points {pts.shape[1]}")
    pts = pts[(pts < ref).all(axis=1)] if pts.size else pts
    if len(pts) == 0:
        return 0.0
    if ref.size != 2:
        return float(moocore.hypervolume(pts, ref=ref))
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]  # by first objective, ties by second
    volume, ceiling = 0.0, ref[1]
    for x, y in pts:
        if y < ceiling:
            volume += (ref[0] - x) * (ceiling - y)
            ceiling = y
    return float(volume)


@dataclass(eq=False)
class Normaliser:
    """Min-max normalisation of each objective: ``(value - lower) / (upper - lower)``.

    Values outside ``[lower, upper]`` are NOT clipped: they map below 0 or above 1, so a point
    worse than ``upper`` can still fall outside the reference point and count for nothing. An
    objective with ``upper == lower`` maps every value to ``value - lower``. Record the bounds
    (``to_dict``) next to every hypervolume they produce, or use `hypervolume_record`.
    """

    lower: np.ndarray
    """Value mapped to 0, one per objective."""
    upper: np.ndarray
    """Value mapped to 1, one per objective."""

    def __post_init__(self) -> None:
        self.lower = np.asarray(self.lower, dtype=float).reshape(-1)
        self.upper = np.asarray(self.upper, dtype=float).reshape(-1)
        if self.lower.shape != self.upper.shape:
            raise ValueError(
                f"lower has {self.lower.size} objectives, upper {self.upper.size}; give one "
                "bound per objective"
            )
        if not (np.isfinite(self.lower).all() and np.isfinite(self.upper).all()):
            raise ValueError(f"bounds must be finite, got lower={self.lower}, upper={self.upper}")
        if (self.upper < self.lower).any():
            raise ValueError(f"upper must be >= lower, got lower={self.lower}, upper={self.upper}")

    @classmethod
    def fit(cls, points: ArrayLike) -> Normaliser:
        """Bounds from the finite values observed per objective.

        Args:
            points: Array of shape ``(n_points, n_objectives)``.

        Returns:
            A normaliser mapping the observed minimum to 0 and maximum to 1.
        """
        pts = _as_points(points)
        finite = np.isfinite(pts)
        if not finite.any(axis=0).all() or pts.size == 0:
            raise ValueError("every objective needs at least one finite value to fit bounds")
        lower = np.where(finite, pts, np.inf).min(axis=0)
        upper = np.where(finite, pts, -np.inf).max(axis=0)
        return cls(lower, upper)

    @property
    def n_objectives(self) -> int:
        """Number of objectives."""
        return self.lower.size

    def transform(self, points: ArrayLike) -> np.ndarray:
        """Normalises points of shape ``(n_points, n_objectives)`` (not clipped)."""
        pts = _as_points(points)
        span = np.where(self.upper > self.lower, self.upper - self.lower, 1.0)
        return (pts - self.lower) / span

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready bounds: ``{"lower": [...], "upper": [...]}``."""
        return {"lower": self.lower.tolist(), "upper": self.upper.tolist()}

    @classmethod
    def from_dict(cls, record: dict[str, Sequence[float]]) -> Normaliser:
        """Inverse of `to_dict`."""
        return cls(np.asarray(record["lower"]), np.asarray(record["upper"]))


def _reference(reference: ArrayLike | None, n_objectives: int) -> np.ndarray:
    if reference is None:
        return np.full(n_objectives, DEFAULT_REFERENCE)
    return np.broadcast_to(np.asarray(reference, dtype=float), (n_objectives,)).copy()


def normalised_hypervolume(
    points: ArrayLike, normaliser: Normaliser, reference: ArrayLike | None = None
) -> float:
    """Hypervolume of min-max normalised points.

    Args:
        points: Raw (minimised) objective values, shape ``(n_points, n_objectives)``.
        normaliser: The bounds to normalise with.
        reference: Reference point in normalised units; default `DEFAULT_REFERENCE` (1.1) per
            objective. A scalar applies to every objective.

    Returns:
        The hypervolume of ``normaliser.transform(points)``.
    """
    ref = _reference(reference, normaliser.n_objectives)
    return hypervolume(normaliser.transform(points), ref)


def hypervolume_record(
    points: ArrayLike, normaliser: Normaliser, reference: ArrayLike | None = None
) -> dict[str, Any]:
    """`normalised_hypervolume` together with the bounds and reference point it used.

    Returns:
        ``{"hypervolume": float, "normaliser": normaliser.to_dict(), "reference": [...]}``.
    """
    ref = _reference(reference, normaliser.n_objectives)
    return {
        "hypervolume": hypervolume(normaliser.transform(points), ref),
        "normaliser": normaliser.to_dict(),
        "reference": ref.tolist(),
    }


def quantile_normalise(points_by_run: Sequence[ArrayLike]) -> list[np.ndarray]:
    """Quantile-transforms the objectives of several runs of one task (Klein et al.).

    Per objective, the finite values of all runs are pooled (N values) and each value ``x`` is
    replaced by its empirical quantile ``#{pooled values < x} / (N - 1)``: the best pooled value
    maps to 0 and the worst to 1 (0 everywhere when N == 1). NaN stays NaN, ``+inf`` maps above
    1. Compare the runs' hypervolumes with reference point `QUANTILE_REFERENCE` (2 per objective),
    whose best possible value is 2^d (regret ``4 - HV`` for two objectives).

    Args:
        points_by_run: One array of shape ``(n_points_i, n_objectives)`` per run.

    Returns:
        The transformed arrays, in the same order and shapes.
    """
    runs = [_as_points(run) for run in points_by_run]
    widths = {run.shape[1] for run in runs if run.size}
    if len(widths) > 1:
        raise ValueError(f"runs disagree on the number of objectives: {sorted(widths)}")
    if not widths:
        return [run.copy() for run in runs]
    pooled = np.concatenate([run for run in runs if run.size])
    out = [np.full(run.shape, np.nan) for run in runs]
    for j in range(pooled.shape[1]):
        values = np.sort(pooled[np.isfinite(pooled[:, j]), j])
        scale = max(len(values) - 1, 1)
        for run, transformed in zip(runs, out, strict=True):
            if run.size:
                column = run[:, j]
                quantile = np.searchsorted(values, column, side="left") / scale
                transformed[:, j] = np.where(np.isnan(column), np.nan, quantile)
    return out
