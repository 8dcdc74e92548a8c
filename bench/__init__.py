"""Benchmarks and GPU checks that print figures: the training engine against plain TRL (`bench.train`), the
GPU parity check, a service job end to end, and their report."""
