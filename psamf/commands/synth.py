"""`psamf synth`: see `psamf.synth`."""

from psamf.synth import add_arguments, run  # noqa: F401  MERGE: the CLI code moves here from psamf/synth.py
