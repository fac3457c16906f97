"""pytest set-up: fake 8 CPU devices before jax is first imported."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
