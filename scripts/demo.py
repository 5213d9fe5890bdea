#!/usr/bin/env python3
"""The main job from a checkout: the dispatch/combine demo and check of deepep_cupy/demo.py (installed
as the ``deepep-cupy-demo`` command).

    python scripts/demo.py            # launches itself under mpiexec (one rank per GPU, or 2 on CPUs)
    mpirun -n 2 python scripts/demo.py
    python scripts/demo.py --help

Exit code 0 only if every check passed on every rank; the last line starts with "DEMO".
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deepep_cupy.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
