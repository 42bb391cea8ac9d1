"""Text data: JSONL / plain-text corpora through a tokenizer, packed by document (`data.source=text`).

tokenizers.py (bytes, sentencepiece, hf, tiktoken), files.py and corpus.py (raw files, pieces),
shards.py (prepared token shards), stream.py (the resumable, sharded training stream),
source.py (the data source). `python -m nanollama.data.text prepare|train-tokenizer` are the tools.
"""

from nanollama.data.text.config import TextDataConfig, TextSourceConfig
from nanollama.data.text.source import TextSource
from nanollama.data.text.tokenizers import Tokenizer, load_tokenizer

__all__ = ["TextDataConfig", "TextSource", "TextSourceConfig", "Tokenizer", "load_tokenizer"]
