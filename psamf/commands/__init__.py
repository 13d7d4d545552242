"""Subcommand modules (`add_arguments(parser)`, `run(args) -> int`) registered in `psamf.cli.COMMANDS`."""
