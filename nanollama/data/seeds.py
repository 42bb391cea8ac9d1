"""Seeds for every batch and file chunk, derived from a key of integers with numpy's SeedSequence.

Each stream has its own tag as the key's second word, so no two streams ever hand the sampler the
same seed. SeedSequence pads a short key with zeros, so no tag is 0.
"""

from __future__ import annotations

import numpy as np

from nanollama.utils.checks import is_int

EVAL = 1  # key (graph_seed, EVAL, i): the trainer's held-out batches
ONFLY = 2  # key (seed, ONFLY, global batch index): the on-the-fly training stream
FILE_TRAIN = 3  # key (seed, FILE_TRAIN, chunk): the train split written to files
FILE_TEST = 4  # key (seed, FILE_TEST, chunk): the test split written to files
LAYOUT = 5  # key (seed, LAYOUT, step, micro): prompt and document lengths of a training batch
EVAL_LENGTH = 6  # key (graph_seed, EVAL_LENGTH, L): the sequences eval_length scores at length L
ONFLY_POOL = 15  # key (seed, ONFLY_POOL, block): the fixed sequences of data.train_sequences=D (onfly)
TEXT_ORDER = 16  # key (seed, TEXT_ORDER, corpus, consumer, epoch): a text reader's piece order (data/text)
TEXT_MIX = 17  # key (seed, TEXT_MIX, consumer, base epoch, block): uniforms picking each text document's corpus
PROBE = 14  # key (graph_seed, PROBE, 0): the sequences probes are fitted and scored on (nanollama.probe)


def derive_seed(*key: int) -> int:
    """A 63-bit non-negative seed from non-negative integers (a hash: distinct keys, distinct seeds)."""
    if not all(is_int(k) and k >= 0 for k in key):
        raise ValueError(f"seed key parts must be non-negative integers, got {key!r}")
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))
