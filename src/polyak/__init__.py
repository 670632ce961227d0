"""polyak: AlgoPerf training algorithms with weight averaging.

Importing the package loads neither torch nor jax; each twin imports its own
framework, so either can be used alone.
"""

__version__ = "0.1.0"
