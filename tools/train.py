#!/usr/bin/env python
"""``apt-train`` from a checkout (code and flags: apt_train/commands/train.py; ``--help`` lists them)."""
import sys

from apt_train.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
