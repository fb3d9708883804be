"""What users run: the SDK, the `strata` CLI, the pytest plugin, benchmark
runs on a branch per run, and the demo."""
