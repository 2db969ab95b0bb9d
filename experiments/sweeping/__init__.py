"""Sweeps: `expansion` (a sweep definition -> named trials and their launch.py flags), `local`
(running trials on this machine), `slurm` (an array-job script) and `summary` (a table of the
trials' results). `experiments/sweep.py` is their command line."""
