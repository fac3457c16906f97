"""pytest set-up: fake 8 CPU devices before jax is first imported, and
JAX's persistent compilation cache, so that a program compiled once (a
resumed run, evaluation after training, a CLI subprocess) is not compiled
again."""

import os
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), "jaxad-test-xla-cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
