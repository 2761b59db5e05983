"""Benchmark harness: `python -m bench [--quick]` measures the relay beside its alternatives.

Every figure comes from one run on the same Postgres, Kafka and Redis (see docs/benchmarks.md).
"""
