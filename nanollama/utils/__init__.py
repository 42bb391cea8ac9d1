"""Small helpers every layer may use (checks, atomic writes, device facts, exit codes); they import nothing of nanollama."""
