"""``python -m timm_gsl.validate``: the same command as ``validate.py`` and ``timm-gsl-validate``
(:mod:`timm_gsl.cli.validate`).

A command-line alias: the library never imports it.
"""
from timm_gsl.cli.validate import cli, main  # noqa: F401

if __name__ == '__main__':
    cli()
