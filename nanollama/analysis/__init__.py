"""Analysis of finished runs: reads run directories, is never imported by training (the top layer)."""
