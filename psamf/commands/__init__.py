"""Subcommand modules of the `psamf` CLI that are not the entry point of a library module."""
