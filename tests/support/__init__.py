"""Test helpers shared by tests, benchmarks and the demo: real worker processes, an OTLP receiver, Redis topologies."""
