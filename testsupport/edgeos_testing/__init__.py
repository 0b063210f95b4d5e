"""Helpers for tests, HIL rigs and benchmarks: real peers on loopback, never mocks."""
