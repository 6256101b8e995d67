"""MLflow tracking: one experiment per benchmark, a parent run per multirun, a run per job, a nested
run per weight-search point, one baseline run per candidate per sweep; the job's one name; the UI's views.

Contracts: scores are fractions in [0, 1], logged rounded to 4 decimals (:mod:`soce.tracking.numbers`);
metric and param keys go through :func:`soce.tracking.store.mlflow_key`; a run whose keys differ from the real
names gets a ``names.json`` artifact ``{key: real name}``.
"""
