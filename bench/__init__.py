"""Benchmarks of the ``fg`` ops (pytest-benchmark suite and the results-table script).

A package so that ``bench.common`` never clashes with a ``common`` module elsewhere (pytest's
default import mode puts test directories on ``sys.path``).
"""
