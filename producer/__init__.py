"""gridtune's producer: the `python -m producer` command line (see producer/cli.py)."""
