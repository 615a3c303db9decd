"""charlm: character-level LSTM language models on Penn Treebank. `charlm.load(path)` opens a checkpoint."""


def __getattr__(name: str):
    # Lazy, so `import charlm.ptb` stays light; `charlm.load` pulls in torch only when used.
    if name == "load":
        from charlm.api import load

        return load
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")


__all__ = ["load"]
