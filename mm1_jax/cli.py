"""What every command-line program shares (train, evaluate, generate, summary,
convert): flag parsing and errors reported as one line.

    if __name__ == "__main__":
      cli.run(main, required=["config", "workdir"])

A mistake of the user's (a config value, a flag, a missing file, a
checkpoint of another config) is printed as one line, `Error: <field>:
<problem and fix>`, with exit code 1 (2 for flags) and no traceback;
--verbose shows the traceback.
"""

from __future__ import annotations

import re
import sys
import traceback
from typing import Callable, Sequence

from absl import app, flags, logging

from mm1_jax import native_logs
from mm1_jax.typed_config import ConfigError

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks of configuration and input "
                             "errors (which are otherwise reported as one line).")

# Exit codes: a bad value in a config or input, a bad flag.
EXIT_INPUT_ERROR = 1
EXIT_FLAG_ERROR = 2


def fail(message: str, code: int = EXIT_INPUT_ERROR) -> None:
  """Prints `Error: message` to stderr and exits; the traceback only with --verbose."""
  if flags.FLAGS.is_parsed() and _VERBOSE.value:
    traceback.print_exc()
  print(f"Error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _override_problem(error: BaseException, argv: Sequence[str]) -> str | None:
  """A ml_collections error about a --config.a.b override, as one line naming
  the override and the closest existing field."""
  text = str(error).replace("\\'", "'").replace('\\"', '"')
  missing = re.search(r"'(\w+)'", text)
  if not missing:
    return None
  name = missing.group(1)
  overrides = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
  flag = next((o for o in overrides if name in o[len("--config."):].split(".")), None)
  if flag is None:
    return None
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  hint = ""
  if suggestion:
    parts = flag[len("--config."):].split(".")
    parts[parts.index(name)] = suggestion.group(1)
    hint = f" Did you mean --config.{'.'.join(parts)}?"
  return f"{flag}: the config has no field {name!r}.{hint}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with every error (config overrides included) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    problem = str(error)
  except (KeyError, AttributeError, TypeError, ValueError) as error:  # From config overrides.
    problem = _override_problem(error, argv) or f"{type(error).__name__}: {error}"
  if "--verbose" in argv:
    traceback.print_exc()
  print(f"Error: {problem.splitlines()[0]}\nPass --helpshort for the flags.", file=sys.stderr)
  sys.exit(EXIT_FLAG_ERROR)


def start(argv: Sequence[str]) -> None:
  """Rejects stray arguments, keeps library INFO chatter (tf.data, SeqIO,
  Orbax) for --verbosity=0, and keeps TensorFlow, which only reads and
  decodes data, off the accelerators."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    import sentencepiece
    sentencepiece.set_min_log_level(1)  # Its INFO lines on every tokenizer load.
  with native_logs.filtered(native_logs.STARTUP_NOISE, enabled=not _VERBOSE.value):
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")


def user_errors() -> tuple[type[BaseException], ...]:
  """Errors that are the user's input, not a bug: reported as one line."""
  errors = (ConfigError, FileNotFoundError, app.UsageError)
  try:
    from mm1_jax.training.checkpoint import CheckpointMismatchError
  except ImportError:  # A launcher's machine need not have the training stack.
    return errors
  return errors + (CheckpointMismatchError,)


def run(main: Callable[[list[str]], None], required: Sequence[str] = (),
        extra_errors: tuple[type[BaseException], ...] = ()) -> None:
  """app.run(main) with one-line errors: flags (and config overrides) while
  parsing, then the user errors `main` raises (user_errors() + extra_errors)."""
  flags.mark_flags_as_required(list(required))

  def main_reporting_errors(argv):
    try:
      main(argv)
    except user_errors() + extra_errors as error:
      if isinstance(error, app.UsageError):
        fail(str(error), EXIT_FLAG_ERROR)
      fail(str(error))

  app.run(main_reporting_errors, flags_parser=parse_flags)
