"""Data: GSSM synthetic sequences (sampling, exact likelihood) and loading."""
