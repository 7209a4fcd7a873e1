"""Report of a search: Pareto-front plots (PNG), hypervolume, and a Markdown summary.

The plots are what users look at first: every evaluated sub-network as a dot, the Pareto front
as a step line, the dense (unpruned) model as a star and the baselines (PINS, GRAIN, layer
dropping) as their own markers, error against parameters and against measured latency.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from nas_prune.search import pareto

log = logging.getLogger(__name__)

REFERENCE_POINT = (1.1, 1.1)
"""Hypervolume reference point in normalised objective space (each objective in [0, 1])."""


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: its last (highest-fidelity) result among completed evaluations."""
    if df.empty:
        return df
    ok = df[df["status"].isin(["ok", "stopped"])]
    ok = ok.sort_values(["trial_id", "fidelity"])
    return ok.groupby(["experiment", "trial_id"], as_index=False, sort=False).tail(1)


def front(df: pd.DataFrame, objectives: Sequence[str]) -> pd.DataFrame:
    """Rows of `df` (status ok, all objectives present) on the Pareto front, sorted by the
    first objective."""
    done = df[(df["status"] == "ok")].dropna(subset=list(objectives))
    if done.empty:
        return done
    mask = pareto.pareto_mask(done[list(objectives)].to_numpy(float))
    # configs that select the same sub-network (e.g. 0 layers with any width) score the same
    same = [c for c in [*objectives, "params", "flops"] if c in done]
    return done[mask].drop_duplicates(subset=same).sort_values(list(objectives))


def hypervolume_table(df: pd.DataFrame, objectives: Sequence[str]) -> tuple[pd.DataFrame, dict]:
    """Hypervolume of each experiment's final results, with one normalisation fitted over all
    experiments (min-max per objective) and REFERENCE_POINT; returns the table and the
    normalisation used, so it can be recorded beside the numbers."""
    rows = df[df["status"] == "ok"].dropna(subset=list(objectives))
    if rows.empty:
        return pd.DataFrame(columns=["experiment", "hypervolume", "evaluations"]), {}
    normaliser = pareto.Normaliser.fit(rows[list(objectives)].to_numpy(float))
    table = []
    for name, group in rows.groupby("experiment"):
        points = normaliser.transform(group[list(objectives)].to_numpy(float))
        hv = pareto.hypervolume(points, np.array(REFERENCE_POINT[:1] * len(objectives)))
        table.append({"experiment": name, "hypervolume": hv, "evaluations": len(group)})
    meta = {"objectives": list(objectives), "normaliser": normaliser.to_dict(),
            "reference_point": [REFERENCE_POINT[0]] * len(objectives)}
    return pd.DataFrame(table), meta


def _styles(df: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """(colour, marker) of each NAS experiment and baseline method, the same in every panel."""
    names = sorted(df.loc[df["method"] == "nas", "experiment"].unique())
    methods = sorted(set(df["method"]) - {"nas", "dense"})
    markers = ["o"] * len(names) + list("sD^vPX" * (len(methods) // 6 + 1))[:len(methods)]
    return {name: (f"C{i % 10}", marker)
            for i, (name, marker) in enumerate(zip(names + methods, markers, strict=True))}


def _plot_panel(ax, df: pd.DataFrame, x: str, xlabel: str, dense: pd.Series | None,
                styles: dict[str, tuple[str, str]]) -> None:
    nas = df[df["method"] == "nas"]
    for name, group in nas.groupby("experiment"):
        done = group[group["status"] == "ok"].dropna(subset=[x, "error"])
        if done.empty:
            continue
        color = styles[name][0]
        ax.scatter(done[x], done["error"], s=12, alpha=0.35, color=color,
                   label=f"{name} (evaluated)")
        f = front(done, [x, "error"])
        ax.step(f[x], f["error"], where="post", linewidth=1.8, color=color,
                label=f"{name} Pareto front")
    for method, group in df[~df["method"].isin(["nas", "dense"])].groupby("method"):
        group = group.dropna(subset=[x, "error"])
        if group.empty:
            continue
        color, marker = styles[method]
        ax.scatter(group[x], group["error"], marker=marker, color=color, s=50, zorder=4,
                   label=method)
        for _, row in group.iterrows():  # which model each point is (sparsity, layers, ...)
            ax.annotate(str(row["trial_id"]), (row[x], row["error"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    if dense is not None and pd.notna(dense.get(x)):
        ax.scatter([dense[x]], [dense["error"]], marker="*", s=250, color="black", zorder=5,
                   label="dense model")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"validation {_error_name(df)}")
    if _error_name(df) == "perplexity":
        ax.set_yscale("log")
        if dense is not None and df["error"].max() > PPL_RANGE * dense["error"]:
            # sub-networks that lost the language (perplexity in the millions) would flatten
            # the useful part of the front: they stay above the top edge
            ax.set_ylim(0.7 * min(df["error"].min(), dense["error"]),
                        PPL_RANGE * dense["error"])
            ax.set_title(f"(perplexities above {PPL_RANGE:g}x the dense model's not shown)",
                         fontsize=8)
    ax.grid(alpha=0.3)


PPL_RANGE = 20.0
"""Perplexity plots show up to this multiple of the dense model's perplexity."""


def _error_name(df: pd.DataFrame) -> str:
    """What the error column holds: "perplexity" for language modelling, else "error"."""
    names = set(df["metric_name"].dropna()) if "metric_name" in df else set()
    return "perplexity" if names == {"perplexity"} else "error"


def attach_latency(frame: pd.DataFrame, latency: pd.DataFrame,
                   hardware: str | None = None) -> pd.DataFrame:
    """Set `latency_ms` / `decode_ms` (decoders) / `hardware` of the rows whose config was
    profiled on `hardware` (default: the first hardware type of the latency table); rows
    measured elsewhere (baselines' saved models, timed by the same actors) keep theirs."""
    if latency.empty or frame.empty:
        return frame
    from nas_prune.results import config_hash

    hardware = hardware or latency["hardware"].iloc[0]
    lat = latency[latency["hardware"] == hardware].drop_duplicates("config_hash", keep="last")
    frame = frame.copy()
    hashes = [config_hash(json.loads(c)) if isinstance(c, str) else None
              for c in frame["config"]] if "config" in frame else [None] * len(frame)
    profiled = set(lat["config_hash"])
    measured = [h in profiled for h in hashes]
    columns = [("latency_ms", "median_ms"), ("decode_ms", "decode_ms")]  # decode: decoders
    for column, source in columns:
        if source not in lat:
            continue
        by_hash = dict(zip(lat["config_hash"], lat[source], strict=True))
        old = frame[column] if column in frame else [None] * len(frame)
        frame[column] = [by_hash[h] if m else v
                         for h, m, v in zip(hashes, measured, old, strict=True)]
    old_hw = frame["hardware"] if "hardware" in frame else [None] * len(frame)
    frame["hardware"] = [hardware if m else v for m, v in zip(measured, old_hw, strict=True)]
    return frame


def latency_on(frame: pd.DataFrame, latency: pd.DataFrame | None, hardware: str) -> pd.DataFrame:
    """`frame` with the latency columns of `hardware` alone: profiled configs from the latency
    table, other rows where they were measured on that type, NaN elsewhere."""
    if latency is not None and not latency.empty:
        frame = attach_latency(frame, latency, hardware)
    frame = frame.copy()
    on = frame["hardware"] == hardware if "hardware" in frame else False
    for column in ("latency_ms", "decode_ms"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").where(on)
    return frame


def plot_pareto(df: pd.DataFrame, out_png: str | os.PathLike, dense: pd.Series | None = None,
                latency: pd.DataFrame | None = None) -> Path:
    """Error vs parameter ratio, and vs measured latency on each hardware type measured (one
    panel per type; a decoder's per-token decode latency in a panel of its own), in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("params_ratio", "parameters (fraction of the dense model)", df, dense)]
    types = [] if latency is None or latency.empty else list(dict.fromkeys(latency["hardware"]))
    if "hardware" in df:  # baselines and the dense model time their saved models themselves
        types += [h for h in dict.fromkeys(df["hardware"].dropna()) if h not in types]
    for hardware in types:
        on = latency_on(df, latency, hardware)
        if "latency_ms" not in on or on["latency_ms"].isna().all():
            continue
        dense_on = None
        if dense is not None:
            dense_on = latency_on(dense.to_frame().T, None, hardware).iloc[0]
        decoder = "decode_ms" in on and on["decode_ms"].notna().any()
        panels.append(("latency_ms", f"{'prefill ' if decoder else ''}latency on {hardware} "
                                     "(ms, median)", on, dense_on))
        if decoder:
            panels.append(("decode_ms", f"decode latency per token on {hardware} (ms)", on,
                           dense_on))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    styles = _styles(df)
    for ax, (x, label, frame, dense_point) in zip(axes[0], panels, strict=True):
        _plot_panel(ax, frame, x, label, dense_point, styles)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"nas_prune: {_error_name(df)} vs. size and latency")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(df: pd.DataFrame, out_dir: str | os.PathLike,
                 objectives: Sequence[str] = ("error", "params_ratio"),
                 latency: pd.DataFrame | None = None, dense: pd.Series | None = None,
                 skipped_files: Sequence[str] | None = None) -> Path:
    """Write `pareto.png` and `summary.md` (Pareto set table, hypervolume) to `out_dir`.

    `skipped_files` are damaged results files `results.load` left out (default: those it
    recorded in `df.attrs["skipped_files"]`); the summary lists them, so a report never looks
    complete when rows are missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if skipped_files is None:
        skipped_files = df.attrs.get("skipped_files", [])
    rows = final_rows(df)
    plot_pareto(rows, out / "pareto.png", dense=dense, latency=latency)
    hv, hv_meta = hypervolume_table(rows[rows["method"] == "nas"], objectives)
    lines = ["# nas_prune report", ""]
    if skipped_files:
        log.warning("the report leaves out the rows of %d damaged results file(s): %s",
                    len(skipped_files), ", ".join(map(str, skipped_files)))
        lines += [f"**Incomplete:** {len(skipped_files)} damaged results file(s) could not be "
                  "read and their rows are left out. Move each to a name starting with `_` "
                  "(readers ignore such names), repair or re-run what wrote it, and report "
                  "again:", "", *(f"- `{file}`" for file in skipped_files), ""]
    if dense is not None:
        lines += [f"Dense model: {_error_name(rows)} {dense['error']:.4f}, "
                  f"{int(dense['params']):,} parameters.", ""]
    lines += ["![Pareto front](pareto.png)", "", "## Hypervolume", ""]
    lines += [hv.to_markdown(index=False, floatfmt=".4f") if not hv.empty else "(no results)", ""]
    if hv_meta:
        lines += ["Normalisation and reference point:", "", "```json",
                  json.dumps(hv_meta, indent=2), "```", ""]
    lines += ["## Pareto-optimal sub-networks", ""]
    nas = rows[rows["method"] == "nas"]
    best = front(nas, list(objectives))
    columns = [c for c in ["experiment", "trial_id", "error", "params", "params_ratio", "flops",
                           "latency_ms", "decode_ms", "config"] if c in best]
    lines += [best[columns].to_markdown(index=False, floatfmt=".4f") if not best.empty
              else "(none)", ""]
    others = rows[~rows["method"].isin(["nas"])].sort_values(["method", "params_ratio"])
    if not others.empty:
        lines += ["## Baselines and the dense model", "",
                  "Final points of each baseline (PINS and magnitude pruning keep the dense "
                  "shape with zeros: their parameters count non-zero weights, their latency "
                  "is the dense model's).", ""]
        cols = [c for c in ["method", "trial_id", "error", "metric_value", "params",
                            "params_ratio", "latency_ms", "hardware", "message"] if c in others]
        lines += [others[cols].to_markdown(index=False, floatfmt=".4f"), ""]
    (out / "summary.md").write_text("\n".join(lines))
    log.info("report written to %s", out)
    return out
