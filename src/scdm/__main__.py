"""``python -m scdm``: the command line."""

from scdm.cli import main

if __name__ == "__main__":
    main()
