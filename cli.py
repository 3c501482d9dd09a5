#!/usr/bin/env python3
"""``python cli.py ...``: the same command line as the installed ``visiondrop`` console script."""

from visiondrop_edge.cli import cli

if __name__ == "__main__":
    cli()
