#!/usr/bin/env python
"""``apt-index-shards`` from a checkout (code and flags: apt_train/commands/index_shards.py; ``--help`` lists them)."""
import sys

from apt_train.commands.index_shards import main

if __name__ == "__main__":
    sys.exit(main())
