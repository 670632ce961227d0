"""The AlgoPerf adapter: the only part of polyak that knows the submission API.

Import the framework builders from their own modules
(``polyak.algoperf.torch_builder``, ``polyak.algoperf.jax_builder``), so that
importing this package loads no framework.
"""
