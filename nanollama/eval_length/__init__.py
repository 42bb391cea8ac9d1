"""`python -m nanollama.eval_length`: the command's name; the code is nanollama/evaluate/length.py."""
