"""Microbenchmarks (``python -m pytest bench -m bench``) and the performance report
(``python -m bench.report``) of hpa-kernels; see bench/report.py."""
