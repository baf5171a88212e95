"""python -m moco.tools.gpu_check (--help)."""
import sys

from moco.tools.gpu_check import main

sys.exit(main())
