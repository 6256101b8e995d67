"""After the sweep: comparison tables read back from MLflow or result.json (tables), the paper's analyses
(analyses), every figure (plots), and the ``python -m soce.report`` entry (cli)."""
