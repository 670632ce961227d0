"""Test-wide settings that must be in place before torch or jax load."""

import os

# JAX tests run on 8 simulated CPU devices so that sharding is exercised.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
