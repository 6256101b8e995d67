"""One job, start to end: the preflight of the world, its inputs, the recipe (pipeline), the merge strategies,
what it leaves behind (outputs), and the Hydra callbacks that open and close a sweep around its jobs."""
