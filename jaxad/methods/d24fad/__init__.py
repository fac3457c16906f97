"""D²4FAD: dual distillation for few-shot anomaly detection (METHODS.md 2).

First landing: the model-level maths only, checked against the original
code's golden vectors (tests/d24fad_golden_test.py). No `METHOD` yet (the
training loop, data and config come later), so `jaxad.methods.NAMES` does
not list it.

* `jaxad.models.reverse_decoder`: the de-WRN-50-2 student decoder;
* `learn_to_weight`: the L2W attention over the K supports;
* `losses`: TSD / SSD losses, the anomaly map, smoothing, image score;
* `forward`: per-slice BatchNorm, the training loss, test-time scoring;
* `jaxad.weights.d24fad`: the original's state dicts -> Flax.
"""
