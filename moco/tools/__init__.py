"""Tools around the library, not part of it: the demo, the benchmarks, the GPU check, the stability
study, plots, and data preparation. Each is run as ``python -m moco.tools.NAME`` (``--help``)."""
