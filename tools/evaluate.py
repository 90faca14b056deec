#!/usr/bin/env python
"""``apt-eval`` from a checkout (code and flags: apt_train/commands/evaluate.py; ``--help`` lists them)."""
import sys

from apt_train.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
