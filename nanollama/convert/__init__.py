"""`python -m nanollama.convert RUN_DIR --to-hf OUT`: a run's weights as a Hugging Face Llama (see cli.py).

The conversion itself lives with the model (nanollama.models.transformer: from_hf, to_hf, save_hf).
"""
