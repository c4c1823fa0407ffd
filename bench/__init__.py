"""Benchmarks: ``python -m bench`` runs every ``bench/bench_*.py`` and prints one table.

Each module exposes ``run() -> list[dict]``; a row has ``name``, ``value``, ``unit`` and ``goal``
(a human-readable target such as ``">= 4"``, or ``""``). Ratios are measured within one run, so
they hold on a loaded machine even when absolute numbers do not.
"""
