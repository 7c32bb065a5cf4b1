"""Compaction: a trained gated model becomes a smaller stock model.

``compact`` folds each gated Linear's eval gates into its active block and shrinks the dimensions
its block pairs (MLP units, attention heads, KV groups; ``layouts`` says how each family pairs them,
``attention``/``mlp`` plan and execute it, ``folding`` holds the shared row/column arithmetic,
``modules`` the GatheredLinear fallback); ``serialize`` writes and loads the result with its
checksummed manifest. ``finegates`` re-exports the public names.
"""
