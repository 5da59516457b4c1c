"""The command lines: thin fronts over the library, which never imports them.

* :mod:`.train`: ``train.py`` / ``timm-gsl-train`` (the recipe: parse, check, build, loop), with its flags and
  checks in :mod:`.train_args` and its typed builders in :mod:`.train_build`;
* :mod:`.validate`: ``validate.py`` / ``timm-gsl-validate``;
* :mod:`.hub`: ``python -m timm_gsl push|export``;
* :mod:`.flags`: the flags train and validate share, declared once;
* :mod:`.common`: one-line errors, the parser class, cheap checks of names and files.
"""
