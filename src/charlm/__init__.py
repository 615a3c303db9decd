"""charlm: character-level LSTM language models on Penn Treebank. `charlm.load(path)` opens a checkpoint."""

__all__ = ["load", "Model", "Dynamic"]


def __getattr__(name: str):
    # Lazy, so `import charlm.ptb` stays light; the API (torch, Lightning) is imported when first used.
    if name in __all__:
        from charlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")
