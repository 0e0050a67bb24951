"""raylane: a Ray-based, elastic platform for LLM post-training."""

__version__ = "0.1.0"
