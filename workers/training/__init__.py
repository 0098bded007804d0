"""The training library: data, models, the loop and artifact storage for ``fleet.train``.

A pure library (no Celery), run in a worker group's device process: the task validates a
``TrainRequest`` and the device process calls ``workers.training.loop.run_training`` with its
device and a store (``workers.training.artifacts``). Importing this package imports nothing
else, so that a consumer can use the artifact store's layout without loading torch.
"""
