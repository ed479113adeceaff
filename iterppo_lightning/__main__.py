"""`python -m iterppo_lightning ARGS`: the `iterppo` command (iterppo_lightning/cli.py)."""

from iterppo_lightning.cli import main

if __name__ == "__main__":
    main()
