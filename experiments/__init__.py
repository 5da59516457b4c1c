"""Study scripts of timm-gsl (``python -m experiments.<name>`` from the repository root)."""
