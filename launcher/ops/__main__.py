"""`python -m launcher.ops` is `rdzv`."""

from launcher.ops.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
