"""lmx: a local LLM inference daemon whose model lifecycle is declarative."""

__version__ = "0.1.0"
