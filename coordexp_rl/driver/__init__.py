"""The Ray driver of a run: placement, stages, Stage-2 fault handling, weight syncs, evaluations."""
