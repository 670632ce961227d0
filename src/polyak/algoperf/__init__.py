"""The AlgoPerf adapter: the only part of polyak that knows the submission API.

Import the framework builders from their own modules
(``polyak.algoperf.builder_torch``, ``polyak.algoperf.builder_jax``), so that
importing this package loads no framework.
"""
