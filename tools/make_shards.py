#!/usr/bin/env python
"""``apt-make-shards`` from a checkout (code and flags: apt_train/commands/make_shards.py; ``--help`` lists them)."""
import sys

from apt_train.commands.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
