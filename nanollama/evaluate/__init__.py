"""Evaluation after training: saved checkpoints on the held-out batches (checkpoints.py, the
`python -m nanollama.evaluate` command) and RoPE length extrapolation (length.py,
`python -m nanollama.eval_length`)."""
