from .corpora import iter_corpus, resolve_corpus_files
from .shards import TokenDataset, prepare_dataset

__all__ = ["iter_corpus", "resolve_corpus_files", "TokenDataset", "prepare_dataset"]
