#!/usr/bin/env python
"""``apt-calibrate`` from a checkout (code and flags: apt_train/commands/calibrate.py; ``--help`` lists them)."""
import sys

from apt_train.commands.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
