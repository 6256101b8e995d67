"""Algorithm 1 at work: selections (correlate, weak set, experts), weight searches (grid, optuna, race), the
in-memory soup evaluator they call, the item cache, and search points spread over GPUs."""
