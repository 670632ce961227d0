"""Small CPU workloads on bundled data (``digits``, ``diabetes``) with AlgoPerf's
Workload interface in PyTorch and JAX, and a local loop with AlgoPerf's
semantics (``loop.run_training``).

Importing this package loads neither torch nor jax; use
``registry.make_workload(name, framework)`` to get a twin.
"""
