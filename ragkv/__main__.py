"""The ``ragkv`` command (and ``python -m ragkv``): Ctrl-C while the command line's modules
are still importing ends quietly with exit code 130, as it does once a command runs."""

from __future__ import annotations


def main() -> None:  # pragma: no cover
    try:
        from ragkv.cli import main as cli
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
