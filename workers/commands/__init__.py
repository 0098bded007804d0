"""User commands: the ``fleet`` CLI and what its subcommands run (demo, status, train, Flower)."""
