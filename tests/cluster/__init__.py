"""Real cluster pieces for tests: a single-node SLURM (slurm.py) and hosts as network namespaces (netns.py)."""
