"""Publishing to the Hugging Face Hub: a checkpoint of our ``train.py`` becomes a plain timm model repo.

A model trained with the group softmax loss predicts with its ordinary linear classifier (SPEC.md,
Inference), so what we publish is an ordinary timm export, loadable with
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` by anyone, without ``timm_gsl``:

* ``model.safetensors``: the weights (never a pickle);
* ``config.json``: timm's own (:func:`timm.models.save_for_hf`) with the class names and the training
  preprocessing (input size, mean, std, crop), without ``num_classes`` inside ``model_args`` (timm
  reads it from the top level; Hugging Face transformers passes it again and fails on the duplicate),
  and without timm's provenance of the base architecture's weights (``origin_url``, paper, tag):
  ``origin_url`` is the published repo's address;
* ``README.md``: a model card with Hub metadata (``base_model`` when training started from a Hub
  model), the group softmax settings, the data conditions, the evaluation (from ``summary.csv`` beside
  the checkpoint), usage that runs as printed, the training command and the citation. It names the
  model as it loads where the files are: ``hf-hub:ORG/NAME`` on the Hub, ``local-dir:FOLDER`` for a
  local export. A card the repo already has is kept unless asked to replace it;
* ``learning_curves.png`` when ``train.py`` wrote one beside the checkpoint.

A checkpoint that records a fitted temperature T (``calibration``, a
:class:`timm_gsl.calibration.CalibrationFit`) is published calibrated: the classifier is divided by T, so
the model returns the trained logits / T (same predictions), and ``config.json`` and the card say so
(``fold_temperature=False`` publishes the weights as trained, with T in ``config.json`` and the card).

Everything that can be checked locally (repo id, token, checkpoint, architecture) is checked before
the first request to the Hub.

Examples:
    >>> from timm_gsl.hub import push_checkpoint
    >>> url = push_checkpoint('output/train/run/model_best.pth.tar', 'my-org/resnet50-gsl')

Where things are:

* :mod:`timm_gsl.hub.checkpoint`: reading a training checkpoint (:class:`TrainingCheckpoint`,
  :func:`load_training_checkpoint`), the model built from it (:func:`build_model`) and the temperature folded into
  its classifier (:func:`fold_into_classifier`, :func:`published_calibration`);
* :mod:`timm_gsl.hub.card`: the model card from the checkpoint's run record (:func:`model_card`, :func:`base_model`,
  :func:`transformers_loads`, :func:`hub_url`, :data:`CITATION`) and :func:`check_repo_id`;
* :mod:`timm_gsl.hub.publish`: export and push (:func:`export_checkpoint`, :func:`push_checkpoint`,
  :func:`check_publish_options`, :class:`HubPublishError`).
"""
from .checkpoint import (TrainingCheckpoint, build_model, fold_into_classifier, load_training_checkpoint,
                         published_calibration)
from .card import CITATION, base_model, check_repo_id, hub_url, model_card, transformers_loads
from .publish import HubPublishError, check_publish_options, export_checkpoint, push_checkpoint

__all__ = [
    'CITATION',
    'HubPublishError',
    'build_model',
    'TrainingCheckpoint',
    'base_model',
    'check_publish_options',
    'check_repo_id',
    'export_checkpoint',
    'fold_into_classifier',
    'hub_url',
    'model_card',
    'published_calibration',
    'push_checkpoint',
    'load_training_checkpoint',
    'transformers_loads',
]
