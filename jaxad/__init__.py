"""jaxad: fast JAX/Flax anomaly detection for medical images."""
