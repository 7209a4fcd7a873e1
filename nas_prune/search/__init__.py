"""Multi-objective search: Pareto ranking and hypervolume, the MO-ASHA scheduler, searchers and
the Ray Tune driver (Klein et al. 2024, arXiv 2405.02267)."""
