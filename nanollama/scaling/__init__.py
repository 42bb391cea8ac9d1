"""`python -m nanollama.scaling LOG_DIR...`: fit a scaling law to launcher sweeps (nanollama.analysis)."""
