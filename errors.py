"""The project's one exception for bad input, raised by library code (models/, data/) and by the
scripts' checks alike. Each script's entry point (common.run) turns it into one line,
`error: <message>`, and exit status 2; any other exception keeps its traceback.

A message says what is wrong (which file, flag or value) and the fix, in one line.
"""


class BadInput(Exception):
    """Input the user can fix: a missing file, a wrong flag, a checkpoint of another run."""


class UnreadableImage(BadInput):
    """An image file that is missing, truncated, corrupt or not an image. Datasets skip and count
    such files; a script given one image to read stops with this message."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def run(main):
    """The entry point of every script: `if __name__ == "__main__": errors.run(main)`. BadInput
    becomes one line on stderr and exit status 2 (argparse's status for a bad command line)."""
    import sys
    try:
        main()
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
