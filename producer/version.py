"""Fleet's distribution name and version, readable without installed package metadata.

``pyproject.toml`` reads ``__version__`` from here (``[tool.setuptools.dynamic]``), so a source
checkout run with ``PYTHONPATH`` reports the same version as an installed wheel.
"""

#: The name on PyPI (``pip install fleet-mlq``); the import packages stay ``producer`` and ``workers``.
DISTRIBUTION = "fleet-mlq"
__version__ = "0.1.0"
