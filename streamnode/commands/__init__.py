"""The node's subcommands (`streamnode run`, `streamnode sources`): flags, config, exit codes.

`streamnode/cli.py` dispatches to them; each imports its layer only when chosen.
"""
