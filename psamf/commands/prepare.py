"""`psamf prepare`: see `psamf.prepare`."""

from psamf.prepare import add_arguments, run  # noqa: F401  MERGE: the CLI code moves here from psamf/prepare.py
