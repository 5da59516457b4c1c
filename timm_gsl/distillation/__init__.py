"""Knowledge distillation as timm's ``train.py`` does it, with timm's losses or the group softmax loss.

timm 1.0.31 distils a student from a frozen teacher with one of three ``timm.task`` tasks, chosen by
``distill_type`` (train.py's ``--kd-distill-type``):

* ``logit``: :class:`timm.task.LogitDistillationTask`, the temperature-scaled KL divergence between
  the student's and the teacher's logits (times ``T**2``), result parts ``task_loss`` and ``kd_loss``;
* ``feature``: :class:`timm.task.FeatureDistillationTask`, the mean squared error between the
  student's pooled pre-logits features (through a learned linear projection when the widths differ)
  and the teacher's, result parts ``task_loss`` and ``kd_loss``;
* ``token``: :class:`timm.task.TokenDistillationTask`, for students with a distillation head
  (distilled DeiT): the main head learns the labels, the distillation head the teacher's soft
  (KL) or hard (argmax) predictions, result parts ``task_loss`` and ``distill_loss``.

The total is ``task_loss_weight * task_loss + distill_loss_weight * <distillation part>``, with timm's
weighting rule (:func:`resolve_loss_weights`).

:func:`create_distillation_task` builds exactly timm's task for every loss but ``'gsl'``. For
``'gsl'`` it builds the ``GroupSoftmax*DistillationTask`` subclasses, in which the group softmax loss is
the task loss: the student is converted (:func:`timm_gsl.convert_model`), the criterion receives its
:class:`~timm_gsl.GroupSoftmaxOutput`, and the distillation term receives what timm's task would give
it (the plain logits, the pre-logits features, the distillation head's logits). Their result also
holds ``softmax_loss`` (the plain softmax cross-entropy of the same logits, as
:class:`timm_gsl.GroupSoftmaxTask` reports it) and, on request, ``grouping_statistics``.

As in timm, ``task.get_eval_model()`` is the student (a plain timm model: same class and state-dict
keys, the teacher outside it), ``task.get_trainable_module()`` is what the optimiser trains (the student,
or for feature distillation the student with the projection), and the teacher stays in eval mode,
frozen, outside both.

Errors name each option by its keyword (``distill_type 'attention'``); functions that raise them take
``names``, a mapping of keywords to how a command line spells them (:mod:`timm_gsl.naming`; train.py passes
:data:`timm_gsl.cli.train_args.DISTILLATION_FLAGS`).

Where things are:

* :mod:`.options`: the option values (:data:`DISTILL_TYPES`, ...), :func:`distillation_loss_names`,
  :func:`resolve_loss_weights`, :func:`check_distillation_options` and the checks of a teacher's name;
* :mod:`.teacher`: the teacher: ``local-dir:`` config, class counts of modules and checkpoints,
  creation as a frozen :class:`timm.task.DistillationTeacher`, the channels of its renormalisation;
* :mod:`.tasks`: the three ``GroupSoftmax*DistillationTask`` classes and the set-up and forward they share;
* :mod:`.factory`: :func:`create_distillation_task` and its checks of the student and the task loss;
* :mod:`.messages`: how errors fit one line (how they name an option is :mod:`timm_gsl.naming`'s).
"""
from .factory import create_distillation_task
from .options import (
    DISTILL_TYPES, KD_LOSS_TYPES, TOKEN_DISTILL_TYPES, check_distillation_options, distillation_loss_names,
    resolve_loss_weights)
from .tasks import (
    GroupSoftmaxFeatureDistillationTask, GroupSoftmaxLogitDistillationTask, GroupSoftmaxTokenDistillationTask)

__all__ = [
    'DISTILL_TYPES',
    'KD_LOSS_TYPES',
    'TOKEN_DISTILL_TYPES',
    'GroupSoftmaxLogitDistillationTask',
    'GroupSoftmaxFeatureDistillationTask',
    'GroupSoftmaxTokenDistillationTask',
    'check_distillation_options',
    'create_distillation_task',
    'distillation_loss_names',
    'resolve_loss_weights',
]
