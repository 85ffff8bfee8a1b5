"""gpt2lab: GPT-2 from scratch in PyTorch, and everything around it.

Importing gpt2lab changes nothing in the process: no environment variable, no file read, no
compiler run. The CPU fast paths are applied explicitly (`gpt2lab.kernels.accelerate`, which
`GPT.from_pretrained` calls for a model on a CPU), and so are the memory settings of CPU training
(`gpt2lab.kernels.tune_cpu_memory`, which `gpt2lab train` applies)."""

from .errors import UserError
from .version import __version__

__all__ = ["GPT", "GPTConfig", "UserError", "load_model", "load_tokenizer", "resolve_model_path", "__version__"]


def __getattr__(name: str):
    """The package's other names, imported on first use (PEP 562): `import gpt2lab` and
    `gpt2lab --help` do not wait for PyTorch."""
    if name in ("GPT", "load_model"):
        from . import api as module
    elif name == "GPTConfig":
        from . import config as module
    elif name == "resolve_model_path":
        from . import pretrained as module
    elif name == "load_tokenizer":
        from . import tokenizer as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(module, name)
    return value
