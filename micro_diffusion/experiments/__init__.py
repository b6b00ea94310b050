"""Equal-compute experiments: experiment files, their planned runs, the runner, verdicts and reports."""
