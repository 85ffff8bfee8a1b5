"""gpt2lab: GPT-2 from scratch in PyTorch, and everything around it.

Importing gpt2lab changes nothing in the process: no environment variable, no file read, no
compiler run. The CPU fast paths are applied explicitly (`gpt2lab.kernels.accelerate`, which
`GPT.from_pretrained` calls for a model on a CPU), and so are the memory settings of CPU training
(`gpt2lab.kernels.tune_cpu_memory`, which `gpt2lab train` applies)."""

from .api import GPT, load_model
from .config import GPTConfig
from .errors import UserError
from .pretrained import resolve_model_path
from .tokenizer import load_tokenizer
from .version import __version__

__all__ = ["GPT", "GPTConfig", "UserError", "load_model", "load_tokenizer", "resolve_model_path", "__version__"]
