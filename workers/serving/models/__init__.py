"""Resident models: loaded once per worker process, after start, and kept on the device."""
