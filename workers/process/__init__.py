"""Process management: device pinning, the worker entry point, the supervisor, health and the embedded Redis."""
