"""``python -m timm_gsl push|export``: the Hub commands of :mod:`timm_gsl.cli.hub`."""
import sys

from timm_gsl.cli.hub import main

if __name__ == '__main__':
    sys.exit(main())
