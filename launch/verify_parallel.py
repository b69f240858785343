#!/usr/bin/env python
"""python launch/verify_parallel.py --config F --tp T --ep E --nproc N  (same as aion-train verify-parallel)"""

import sys

from aion_train.cli import main

if __name__ == "__main__":
    sys.exit(main(["verify-parallel"] + sys.argv[1:]))
