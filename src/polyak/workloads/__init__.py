"""Small CPU workloads on bundled data with AlgoPerf's Workload interface in
PyTorch and JAX, and a local loop with AlgoPerf's semantics
(``loop.run_training``): ``digits`` (scikit-learn's 8×8 digits, an MLP),
``diabetes`` (scikit-learn's diabetes regression, an MLP) and ``textlm`` (a
byte-level transformer language model on Python's own reference-manual
topics).

Importing this package loads neither torch nor jax; use
``registry.make_workload(name, framework)`` to get a twin.
"""
