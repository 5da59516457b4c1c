#!/usr/bin/env python3
"""Train a timm model with the group softmax loss: timm's train.py flags plus --loss/--gsl-*.

``python train.py`` with no data flag trains on the embedded Fashion-MNIST subset; see
``python train.py --help`` and :mod:`timm_gsl.cli.train`.
"""
from timm_gsl.cli.train import main

if __name__ == '__main__':
    main()
