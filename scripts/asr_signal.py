r"""How much box signal the ASR-Net's inputs carry, for a finished DDAD run.

The ASR-Net learns from synthetic patch anomalies of the known normals. This
pastes them exactly as training does (jaxad.data.synthesis) and prints, for
each discrepancy map and for the refined P(anomalous), the mean inside the
pasted boxes against the mean outside them. A map whose two means are equal
gives the ASR-Net nothing to learn from. It then prints the ASR-Net's
response to constant input maps, to show the function it learned.

  python scripts/asr_signal.py --config configs/ddad.py --workdir W \
    [--config.k=v ...as in training]
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxad import cli, evaluate
from jaxad.data import oneclass, resident, synthesis
from jaxad.methods.ddad import ensembles, refine

_BATCHES = flags.DEFINE_integer("batches", 8, "Synthetic batches of 32.")


def main(argv: list[str]) -> None:
  del argv
  config, workdir = cli.CONFIG.value, cli.WORKDIR.value
  cli.setup_logging()
  _, model, _ = evaluate.restore(config, workdir)
  normal = jnp.asarray(oneclass.load(config.data, workdir).normal)
  refined = config.refine.enabled
  sums = {}
  for i in range(_BATCHES.value):
    k_idx, k_src, k_paste = jax.random.split(jax.random.key(i), 3)
    idx = jax.random.randint(k_idx, (32,), 0, len(normal))
    src = synthesis.other_indices(k_src, idx, len(normal))
    x, mask = synthesis.paste_patches(
      k_paste,
      resident.to_unit_range(normal[idx]),
      resident.to_unit_range(normal[src]),
    )
    maps = ensembles.ensemble_maps(model, x, config=config)
    if refined:
      maps["P (refined)"] = _refined(model, maps, config)
    inside = np.asarray(mask) > 0.5
    for name, value in maps.items():
      value = np.asarray(value)
      acc = sums.setdefault(name, np.zeros(4))
      acc += [value[inside].sum(), inside.sum(), value[~inside].sum(), 0]
      acc[3] += (~inside).sum()
  print(f"{'map':<14}{'in box':>10}{'outside':>10}{'ratio':>8}")
  for name, (s_in, n_in, s_out, n_out) in sums.items():
    m_in, m_out = s_in / n_in, s_out / n_out
    print(f"{name:<14}{m_in:>10.5f}{m_out:>10.5f}{m_in / m_out:>8.3f}")
  if refined:
    print("\nASR-Net P(anomalous) for constant input maps (all inputs = v):")
    for v in (0.02, 0.04, 0.06, 0.08, 0.12, 0.2):
      size = config.data.image_size
      const = jnp.full((1, size, size), v)
      p = _refined(model, {"intra": const, "inter": const}, config)
      print(f"  v = {v:<5} P = {float(p[0, size // 2, size // 2]):.3f}")


def _refined(model, maps, config):
  return refine.anomaly_probability(
    model.net("asr"), maps, config.refine.inputs
  )


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
