#!/usr/bin/env python
"""``apt-visualize`` from a checkout (code and flags: apt_train/commands/visualize.py; ``--help`` lists them)."""
import sys

from apt_train.commands.visualize import main

if __name__ == "__main__":
    sys.exit(main())
