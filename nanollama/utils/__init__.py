"""Small helpers every layer may use: checks, atomic writes, device facts, exit codes.

They import nothing of nanollama, so the kernels may use them too.
"""
