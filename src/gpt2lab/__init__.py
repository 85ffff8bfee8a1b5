"""gpt2lab: GPT-2 from scratch in PyTorch, and everything around it."""

from .hugepages import prefer_huge_pages

# Before anything below imports torch and allocates: PyTorch reads the switch once (hugepages.py).
prefer_huge_pages()

from .api import GPT, load_model
from .config import GPTConfig
from .errors import UserError
from .pretrained import resolve_model_path
from .tokenizer import load_tokenizer
from .version import __version__

__all__ = ["GPT", "GPTConfig", "UserError", "load_model", "load_tokenizer", "resolve_model_path", "__version__"]
