"""The paper's analyses and ablations as studies (tools/study.py): one small module per study.

common.py holds what they share: the shapes world, running one variant x seed (pretraining and fine-tuning as the
entry points a user runs, `key=value` overrides in a subprocess, or a Slurm job array), collecting the metrics
and writing the table and plots.
"""
