"""``llava-mole`` command line: the entry point only; work happens in the library modules.

``parser`` names every command's options, ``commands`` builds worlds, trains and runs studies,
``artifacts`` uses a trained adapter (eval, predict, serve, export); :func:`main` maps a user's
error to one line and exit status 2.
"""

from __future__ import annotations

import errno
import sys

from .commands import _close_process_group
from .parser import build_parser

__all__ = ["_close_process_group", "build_parser", "main"]


def _listing_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is a short bounded list (strict mode's first bad samples)."""
    from ..data.formats import DataError

    return (DataError,)


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..adapters.inject import AdapterError
    from ..data.formats import DataError
    from ..models.loading import ModelLoadError
    from ..schema import SchemaError
    from ..study.compare import StudyWorkersError
    from ..train.config import ConfigError
    from ..train.lock import RunLockedError
    from ..train.trainer import NonFiniteLossError

    return (
        ConfigError,
        SchemaError,
        AdapterError,
        DataError,
        ModelLoadError,
        NonFiniteLossError,
        RunLockedError,
        StudyWorkersError,
        ValueError,
        FileNotFoundError,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as err:  # noqa: BLE001 - mapped to one line below
        if debug or isinstance(err, SystemExit):
            raise
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            print(
                f"llava-mole {args.command}: error: disk full while writing ({err.filename or err}); "
                "the previous checkpoint is kept",
                file=sys.stderr,
            )
            return 2
        if isinstance(err, _user_errors()) or isinstance(err, OSError):
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if isinstance(err, _listing_errors()):
                message = str(err).strip()  # the bad samples' list is the point of strict mode
            print(f"llava-mole {args.command}: error: {message}", file=sys.stderr)
            print("  (run with --debug for the full traceback)", file=sys.stderr)
            return 2
        raise
