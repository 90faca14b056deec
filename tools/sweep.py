#!/usr/bin/env python
"""``apt-sweep`` from a checkout (code and flags: apt_train/commands/sweep.py; ``--help`` lists them)."""
import sys

from apt_train.commands.sweep import main

if __name__ == "__main__":
    sys.exit(main())
