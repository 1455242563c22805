"""Analysis tools: figures of the training dynamics (plots.py) and seed sweeps with intervals
(sweep.py)."""
