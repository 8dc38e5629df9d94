"""Helpers for tests and benchmarks: a fake OpenAI server with fault injection.

Shipped so that benchmarks and users' own tests can use it, never imported by the toolkit at
run time (a test checks that the command line does not load it).
"""
