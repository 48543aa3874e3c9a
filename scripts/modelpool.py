"""`python scripts/modelpool.py ...` from a source checkout: the installed `modelpool` command."""
import sys

from modelpool.cli import main

if __name__ == "__main__":
    sys.exit(main())
