"""Celery wiring: the app, the tasks, the consumer guard, Redis fixes, the delivery sweeper and dead letters."""
