"""The command-line entry points: argument parsing, one-line errors and exit codes."""
