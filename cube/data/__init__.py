"""Data on disk: Q&A files and splits, the embedding store, run folders, storage URIs and the cache."""
