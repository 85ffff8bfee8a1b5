"""Data: corpora into llm.c token shards (`prepare_dataset`), and a loader of (x, y) batches that splits
them across ranks and resumes exactly (`TokenLoader`)."""

__all__ = ["Shard", "TokenDataset", "TokenLoader", "open_dataset", "prepare_dataset", "read_shard", "shard_length", "write_shard"]


def __getattr__(name: str):
    """The package's names, imported on first use (PEP 562): preparing data needs no PyTorch, the
    loader does."""
    if name in ("Shard", "TokenDataset", "open_dataset"):
        from . import dataset as module
    elif name == "TokenLoader":
        from . import loader as module
    elif name in ("read_shard", "shard_length", "write_shard"):
        from . import shards as module
    elif name == "prepare_dataset":
        # Named apart from its module, so that `gpt2lab.data.prepare` stays the module.
        from .prepare import prepare as value

        globals()[name] = value
        return value
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(module, name)
    return value
