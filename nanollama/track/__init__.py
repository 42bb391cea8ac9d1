"""After-the-fact tracking: `python -m nanollama.track wandb|tensorboard RUN_DIR|LOG_DIR...` replays run directories.

replay.py    a run directory's records (metrics, evaluations, probes, profile) and profiler traces
upload.py    into wandb runs (one per task of a sweep, grouped) or TensorBoard event files, incrementally
offline.py   reads local offline wandb runs back (what a later `wandb sync` sends, rewinds applied)
"""
