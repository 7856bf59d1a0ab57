"""`python -m gaugenet`: the command line, as the `gaugenet` script."""

from .cli import main

if __name__ == "__main__":
    main()
