"""The `psamf` subcommands: argument parsing and printing, on top of the library modules (one module each)."""
