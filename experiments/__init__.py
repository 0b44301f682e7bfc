"""Experiments that compose both families: the comparison, the anchor tables, benchmarks, and the CLI entry point."""
