"""Benchmarks, run under mpirun: `python -m mpipar.bench NAME [flags]`. Each prints ours next to
its peer measured in the same run, as ratios (timings on a shared machine are noisy)."""
