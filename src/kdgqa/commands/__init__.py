"""Subcommands of the ``kdgqa`` CLI, one module each (see :mod:`kdgqa.cli`)."""
