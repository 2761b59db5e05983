"""The `outbox-relay` command (and `python -m outbox.relay`).

Apart from the standard library this imports nothing until the CLI loads, so that a missing
extra (`pip install outbox` without `[relay]`, or `--broker kafka` without `[kafka]`) is one
line naming it, not a traceback."""

from __future__ import annotations

import sys

from outbox.extras import MissingExtraError, missing_extra


def main() -> None:
    try:
        from outbox.relay.cli import main as cli

        cli()
    except ModuleNotFoundError as error:
        retold = missing_extra(error, "outbox-relay")
        if not isinstance(retold, MissingExtraError):
            raise
        print(f"outbox-relay: error: {retold}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
