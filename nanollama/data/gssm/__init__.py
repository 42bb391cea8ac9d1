"""GSSM data: hidden Markov chains on a graph emitting tokens, with the exact Bayes-optimal loss.

graph.py (GSSMConfig, GSSM: kernels, sampler, hmm(), nll()), hmm.py (exact likelihood), onfly.py and
stream.py (the resumable training streams), files.py and reader.py (token files), source.py (the
`onfly` and `files` data sources). `python -m nanollama.data.gssm` writes token files.
"""

from nanollama.data.gssm.config import GSSMConfig, NodeConfig
from nanollama.data.gssm.graph import GSSM
from nanollama.data.gssm.source import GSSMDataConfig, GSSMSource

__all__ = ["GSSM", "GSSMConfig", "GSSMDataConfig", "GSSMSource", "NodeConfig"]
