"""flywheel: turn a RAG app's retrieval logs into a better retrieval model every week."""

__version__ = "0.1.0"
