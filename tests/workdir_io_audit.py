"""Runs a program and reports the workdir accesses that bypass mm1_jax.paths.

    python tests/workdir_io_audit.py REPORT WATCHED -m MODULE [ARGS...]
    python tests/workdir_io_audit.py REPORT WATCHED -c CODE

A gs:// workdir only works if every file under it is opened through a layer
that understands URIs: etils.epath (mm1_jax.paths), Orbax, TensorFlow's
gfile, clu / TensorBoard writers. An audit hook, installed before anything
else is imported, sees each file event under WATCHED and walks the stack
outward from the caller: an allowed layer's frame first is fine, an mm1_jax
frame first means mm1_jax touched the file with a local-only call (builtin
open, os.makedirs, np.savez, ...). Those are written to REPORT as JSON,
[{"event", "path", "where": "module:line"}], also when the program fails.

-c runs CODE as if it were the module mm1_jax.audit_probe, so that the
detector itself can be checked.
"""

import json
import os
import runpy
import sys

# The file events of the os, io and shutil modules that name a path.
EVENTS = frozenset({"open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir",
                    "shutil.rmtree", "os.listdir", "os.scandir"})
# Events whose first two arguments are paths (source, destination).
TWO_PATHS = frozenset({"os.rename", "os.replace"})
# Top-level packages whose file access understands gs://.
ALLOWED = frozenset({"etils", "orbax", "tensorflow", "tensorstore", "clu", "tensorboard"})
PROBE_MODULE = "mm1_jax.audit_probe"


def module_name(frame) -> str:
  """The module a frame runs in; `python -m x.y` runs x.y as __main__."""
  spec = frame.f_globals.get("__spec__")
  return getattr(spec, "name", None) or frame.f_globals.get("__name__") or ""


def install(watched: str, violations: list) -> None:
  """Adds to `violations` each access under `watched` that mm1_jax makes itself."""
  watched = os.path.abspath(watched)
  prefix = watched + os.sep

  def under_watched(path):
    try:
      path = os.path.abspath(os.fsdecode(path))
    except TypeError:  # A file descriptor, or None (os.listdir()).
      return None
    return path if path == watched or path.startswith(prefix) else None

  def hook(event, args):
    if event not in EVENTS:
      return
    for path in args[:2] if event in TWO_PATHS else args[:1]:
      path = under_watched(path)
      if path is None:
        continue
      frame = sys._getframe(1)  # The caller of open(), os.mkdir(), ...
      while frame is not None:
        module = module_name(frame)
        top = module.partition(".")[0]
        if top in ALLOWED:
          break
        if top == "mm1_jax":
          violations.append({"event": event, "path": path,
                             "where": f"{module}:{frame.f_lineno}"})
          break
        frame = frame.f_back

  sys.addaudithook(hook)


def main() -> None:
  report, watched, mode, target, *args = sys.argv[1:]
  # As `python -m`: the working directory (the repo), not tests/, is importable.
  sys.path[0] = os.getcwd()
  violations = []
  install(watched, violations)
  try:
    if mode == "-m":
      sys.argv = [target, *args]
      runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif mode == "-c":
      exec(compile(target, "<probe>", "exec"), {"__name__": PROBE_MODULE})
    else:
      raise SystemExit(f"unknown mode {mode}; use -m or -c")
  finally:
    # Copied first: background threads (Orbax) may still be appending.
    found = list(violations)
    with open(report, "w") as f:
      json.dump(found, f, indent=1)


if __name__ == "__main__":
  main()
