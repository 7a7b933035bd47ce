"""Helpers shared by test modules and benchmarks (stand-in models, tiny datasets, CLI subprocess runs).

Kept apart from the `test_*.py` files so that importing a helper never drags in another module's
tests, and so that the package itself ships nothing that only tests use.
"""
