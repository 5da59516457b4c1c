"""``python -m timm_gsl.train``: the same command as ``train.py`` and ``timm-gsl-train`` (:mod:`timm_gsl.cli.train`).

A command-line alias: the library never imports it.
"""
from timm_gsl.cli.train import cli, main  # noqa: F401

if __name__ == '__main__':
    cli()
