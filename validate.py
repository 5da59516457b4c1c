#!/usr/bin/env python3
"""Evaluate a timm model or a timm-gsl checkpoint: timm's validate.py command line.

All the logic lives in :mod:`timm_gsl.cli.validate`; ``python validate.py --help`` lists the flags.
"""
from timm_gsl.cli.validate import main

if __name__ == '__main__':
    main()
