"""The version of gpt2lab, in a module of its own so that any part can record it."""

__version__ = "0.1.0"
