"""Watching a run: the metrics file, system facts (host, memory, GPUs) and FLOP accounting (MFU/HFU)."""
