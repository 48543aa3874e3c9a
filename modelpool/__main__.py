"""`python -m modelpool`: the same command as `modelpool` on the PATH."""
import sys

from modelpool.cli import main

sys.exit(main())
