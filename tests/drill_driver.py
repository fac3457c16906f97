"""`python -m jaxad.train` that sends itself a signal at a given step.

  DRILL_SIGNAL_AT=<step>:<SIGTERM|SIGKILL> python -m tests.drill_driver \
      --config ... --workdir ...

runs jaxad.train's own `main` (flags, exit codes, messages), with a step
callback that sends the signal with os.kill once global step <step> is
dispatched: the drill's SIGTERM lands during training at a known step, not
whenever a reader of the log gets to it (a smoke step can take 30 ms).
"""

import functools
import os
import signal

from absl import app, flags

from jaxad import cli, train


def _on_step(at: int, sig: int, sent: list, step: int) -> None:
  # >=: a resumed run may start past `at`; once: a second SIGTERM would
  # stop at once, without a checkpoint.
  if step >= at and not sent:
    sent.append(step)
    os.kill(os.getpid(), sig)


if __name__ == "__main__":
  spec = os.environ.get("DRILL_SIGNAL_AT", "")
  if spec:
    at, name = spec.split(":")
    train.run = functools.partial(
      train.run,
      on_step=functools.partial(_on_step, int(at), signal.Signals[name], []),
    )
  flags.adopt_module_key_flags(cli)
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(train.main, flags_parser=cli.parse_flags)
