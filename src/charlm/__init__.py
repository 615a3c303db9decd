"""charlm: character-level language models on Penn Treebank. `charlm.load(path)` opens a checkpoint.

Two layers. The ML core, which imports no Hydra (the import contract in pyproject.toml): ptb, data, cache,
symbols (the data); nets/ (the networks); module, schedules, budget, metrics, optim, precision, callbacks,
checkpoint (training); api (charlm.load). The run layer, which composes configs with Hydra: train, config,
errors, devices, sweep, report, search, resolvers; and the tools evaluate, query, sample.
"""

__all__ = ["load", "Model", "Dynamic"]


def __getattr__(name: str):
    # Lazy, so `import charlm.ptb` stays light; the API (torch, Lightning) is imported when first used.
    if name in __all__:
        from charlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")
