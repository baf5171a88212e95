"""Tools around the library, not part of it: the demo, the benchmarks, the memory estimate, the stability
study, plots, and data preparation (the GPU check is tests/gpu_check.py). Each is run as
``python -m moco.tools.NAME`` (``--help``)."""
