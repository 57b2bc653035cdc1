"""What every command line of the project shares: one `FATAL` line per error, quiet logs, help.

  run_guarded(main, verbose)  runs `main`; an exception becomes one `FATAL <Type>: <message>` line on
                              stderr and exit status 1 (the traceback only when `verbose`); Ctrl-C
                              before the training loop becomes one line and status 130.
  quiet_logs(verbose)         hides the libraries' start-up chatter (TensorFlow's C++ banner, TFDS
                              deprecations, Orbax and JAX INFO/WARNING records) unless `verbose`.
  parse_value(text)           a NAME=VALUE value: its Python literal, else the bare string.
  absl_flags_parser           absl's parser, with --help/--helpshort/--helpfull exiting 0, and an
                              unknown or malformed flag as one FATAL line (status 2, as argparse).

Exit statuses (documented in the README, "When things go wrong"):
  0 done; 1 an error (the FATAL line says what to change); 2 a command-line mistake;
  130 stopped by Ctrl-C (SIGINT) after saving; 143 stopped by SIGTERM (preemption) after saving.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130  # 128 + SIGINT: the shell's convention, so `train && evaluate` stops
EXIT_SIGTERM = 143  # 128 + SIGTERM: SLURM requeue / Kubernetes restart policies see a failure

HELP_ARGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")

# Exceptions a user's input causes; anything else is reported as a bug (still in one line).
USER_ERRORS = (ValueError, OSError, KeyError, ImportError, TimeoutError, FloatingPointError)

_MAX_MESSAGE = 800  # a FATAL line stays one readable line even for a library's long message


def parse_value(text: str) -> Any:
    """The value of a `NAME=VALUE` command-line item: 4, 1e-6, True, None, (384, 384), or a bare
    string such as gap."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, Any]:
    """`--set FIELD=VALUE` items → {field: parse_value(VALUE)}; an item without `=` is a usage
    error (exit 2) naming it."""
    overrides = {}
    for item in items:
        field, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected FIELD=VALUE")
        overrides[field] = parse_value(text)
    return overrides


def fatal_line(error: BaseException) -> str:
    """`FATAL <Type>: <message>` in one line; unexpected exception types say how to see more."""
    message = " ".join(str(error).split()) or repr(error)
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    line = f"FATAL {type(error).__name__}: {message}"
    if not isinstance(error, USER_ERRORS):
        line += " (unexpected: rerun with --verbose for the traceback and report it)"
    return line


class RecordedInterrupt:
    """The SIGINT handler while a command runs (until the training loop installs its own): raises
    KeyboardInterrupt as Python's default does, and remembers it. Python drops an exception raised
    inside a gc callback (JAX's `_xla_gc_callback`: "Exception ignored in ...") and a library may
    swallow one, so a Ctrl-C during dataset preparation could be lost and the run train to the end;
    remembered, it still ends the command with 130 (`StopSignals` checks `pending` on entry)."""

    def __init__(self):
        self.pending = False

    def __call__(self, signum, frame):
        del signum, frame
        self.pending = True
        raise KeyboardInterrupt


def run_guarded(main: Callable[[], int | None], verbose: bool | Callable[[], bool] = False) -> int:
    """Runs `main()`; returns its exit status, or 1 / 130 with one FATAL line for an exception."""
    recorder, previous = RecordedInterrupt(), None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, recorder)
    try:
        status = int(main() or 0)
        if recorder.pending:  # a Ctrl-C that something swallowed: still an interrupted command
            raise KeyboardInterrupt
        return status
    except SystemExit:
        raise
    except KeyboardInterrupt as e:
        sys.stdout.flush()
        reason = str(e) or "interrupted (Ctrl-C) before training started; nothing was saved"
        print(f"FATAL {reason}", file=sys.stderr, flush=True)
        if getattr(e, "abort_now", False):  # a second Ctrl-C: nothing may wait on exit
            sys.stdout.flush()
            os._exit(EXIT_SIGINT)
        return EXIT_SIGINT
    except Exception as e:  # noqa: BLE001  (every error ends in one line; --verbose shows more)
        if recorder.pending:  # Ctrl-C surfacing as another error (a library wrapped it)
            print(f"FATAL interrupted (Ctrl-C); {fatal_line(e)[6:]}", file=sys.stderr, flush=True)
            return EXIT_SIGINT
        if verbose() if callable(verbose) else verbose:
            traceback.print_exc()
        sys.stdout.flush()
        print(fatal_line(e), file=sys.stderr, flush=True)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------------
# Quiet logs.

# Libraries whose INFO/WARNING records are start-up chatter for a user (shown with --verbose).
_CHATTY = ("orbax", "tensorflow_datasets", "tensorflow", "jax", "etils", "absl")


class _LibraryFilter(logging.Filter):
    """Drops the libraries' records below ERROR, and Orbax's errors (our own line reports them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio" and "never retrieved" in record.getMessage():
            return False  # Orbax's failed background writes: our CheckpointWriteError line says it
        path = record.pathname.replace(os.sep, "/")
        library = next((name for name in _CHATTY if f"/{name}/" in path), None)
        if library is None:
            return True
        if library == "orbax":
            return False
        return record.levelno >= logging.ERROR


_FILTER = _LibraryFilter()
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class _OwnRecordsPlain(logging.Formatter):
    """Our own records as `WARNING: message` (absl's `W1202 13:34:11.45 139853 file.py:113]`
    prefix is for the libraries' records, shown with --verbose)."""

    def __init__(self, formatter: logging.Formatter | None):
        super().__init__("%(levelname)s: %(message)s")
        self._other = formatter or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if os.path.abspath(record.pathname).startswith(_PACKAGE_DIR):
            return super().format(record)
        return self._other.format(record)


def plain_warnings() -> None:
    """Our warnings (a guessed setting, a skipped file) as `WARNING: message` lines on stderr."""
    logging.basicConfig(format="%(levelname)s: %(message)s")


def quiet_logs(verbose: bool, *, tensorflow: bool = True) -> None:
    """Only our own lines unless `verbose`: call before importing TensorFlow, JAX or Orbax.

    `tensorflow`: load TensorFlow (and TFDS) now, silently; the commands that never need it
    (predict, convert, benchmark) pass False and stay fast to start.
    """
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # TFDS's own deprecation warnings about its internals are nothing a user can act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # JAX's persistent compilation cache failing to read/write (a full disk) is only slower.
    warnings.filterwarnings("ignore", message=r".*persistent compilation cache.*")
    # Orbax's background writes abandoned by a failed save (full disk): our FATAL line says it.
    warnings.filterwarnings(
        "ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning
    )
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for logger in (logging.getLogger(), logging.getLogger("absl"), logging.getLogger("jax")):
        for handler in logger.handlers:
            handler.addFilter(_FILTER)
    absl_handler = absl_logging.get_absl_handler()
    absl_handler.addFilter(_FILTER)
    if not isinstance(absl_handler.formatter, _OwnRecordsPlain):
        absl_handler.setFormatter(_OwnRecordsPlain(absl_handler.formatter))
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "Unable to init 'tpu'"
    sys.excepthook = _quiet_excepthook
    sys.unraisablehook = _quiet_unraisablehook
    if not tensorflow:
        return
    with _stderr_silenced():
        # TensorFlow's C++ start-up banner (oneDNN, absl::InitializeLog) bypasses every Python
        # setting: it is written to file descriptor 2 while the library loads.
        import tensorflow  # noqa: F401
    try:
        import tensorflow_datasets as tfds
    except ImportError:  # pragma: no cover - tfds is a requirement
        return
    # TFDS's bars are switched on only around a preparation, and only on a terminal (see
    # progress.tfds_bars); our own builders draw ours instead.
    tfds.disable_progress_bar()


def _quiet_excepthook(exc_type, value, tb):
    # After a failed asynchronous save, tensorstore's callbacks keep reaching Orbax's closed event
    # loop and C++ prints each one through sys.excepthook: dozens of tracebacks burying our line.
    if isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
        return
    sys.__excepthook__(exc_type, value, tb)


def _quiet_unraisablehook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
        return
    if isinstance(value, KeyboardInterrupt):  # a Ctrl-C in a gc callback: RecordedInterrupt has it
        return
    sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ---------------------------------------------------------------------------------------------
# absl command lines (train.py, vit_jax.tools.benchmark).


def absl_flags_parser(argv: list[str]) -> list[str]:
    """absl's parsing, with help exiting 0 and flag errors as one FATAL line (exit 2)."""
    from absl import app, flags

    wanted = [a for a in argv[1:] if a.split("=")[0] in HELP_ARGS]
    if wanted:
        flags.FLAGS.mark_as_parsed()
        full = wanted[0] == "--helpfull"
        if full or flags.FLAGS.main_module_help():
            app.usage(shorthelp=not full, writeto_stdout=True)
        else:  # run through a wrapper (train.py, a console script): absl would list no flags
            sys.stdout.write(sys.modules["__main__"].__doc__ or f"USAGE: {argv[0]} [flags]\n")
            sys.stdout.write("\nflags:\n" + _package_flags_help(flags.FLAGS) + "\n")
        if not full:
            print("\nTry --helpfull to get a list of all flags.")
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"FATAL {_without_traceback(str(e))} (--help lists the flags)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _without_traceback(message: str) -> str:
    """One line: a message that embeds a traceback (a config file's get_config failing, as
    ml_collections reports it) keeps its text before the traceback and the final error line."""
    head, marker, rest = message.partition("Traceback (most recent call last):")
    if marker:
        lines = [line for line in rest.splitlines() if line.strip()]
        message = f"{head} {lines[-1] if lines else ''}"
    return " ".join(message.split())


def _package_flags_help(flag_values) -> str:
    """--helpshort's flag list for the flags this package's modules define (and declare key)."""
    # absl names a module by its import name (`vit_jax.tools.train`), or by its path when it is __main__.
    ours = (__package__ + ".", os.path.dirname(os.path.abspath(__file__)) + os.sep)
    modules = [
        m
        for m in flag_values.flags_by_module_dict()
        if str(m).startswith(ours) and m != __name__  # --verbose: each CLI declares it key
    ]
    return "\n".join(flag_values.module_help(m) for m in sorted(modules))


def define_verbose_flag():
    """`--verbose`: tracebacks and library logs. The caller declares it a key flag
    (`flags.declare_key_flag('verbose')`) so that its --helpshort lists it."""
    from absl import flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Show tracebacks and the libraries' own log lines.")
    return flags.FLAGS["verbose"]


def absl_verbose() -> bool:
    """--verbose, or absl's --verbosity raised to INFO (0) or above."""
    from absl import flags

    f = flags.FLAGS
    if not f.is_parsed():
        return False
    return bool(("verbose" in f and f.verbose) or (f["verbosity"].present and f.verbosity >= 0))


# ---------------------------------------------------------------------------------------------
# argparse command lines (tools.predict, tools.convert, tools.pretrained, tools.input_benchmark).


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `--verbose`, and a usage mistake as one FATAL line (exit 2)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--verbose",
            action="store_true",
            help="show tracebacks and the libraries' own log lines",
        )

    def error(self, message: str):
        self.exit(
            EXIT_USAGE, f"FATAL {self.prog}: {' '.join(message.split())} (--help for usage)\n"
        )


def wants_verbose(argv) -> bool:
    return "--verbose" in (sys.argv[1:] if argv is None else argv)


# ---------------------------------------------------------------------------------------------
# Compilation cache.


def default_compilation_cache_dir() -> str:
    from vit_jax.interop import fetch  # the one reader of $VIT_JAX_CACHE

    return os.path.join(fetch.cache_root(), "jax_compilation")


def enable_compilation_cache(directory: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache, so a rerun skips compiling (minutes for big
    models). `directory`: None means $JAX_COMPILATION_CACHE_DIR if set, else the default under
    $VIT_JAX_CACHE (~/.cache/vit_jax); '' turns it off. Returns the directory in use (or None).
    Programs that compile in under a second are not stored (JAX's
    jax_persistent_cache_min_compile_time_secs)."""
    import jax

    if directory is None:
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_compilation_cache_dir()
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
