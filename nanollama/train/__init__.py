"""Training: the config (config.py), the loop (trainer.py), loss, optimizer, checkpoints, signals, and the CLI."""
