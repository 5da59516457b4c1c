"""timm-gsl: train any timm backbone with the group softmax loss with discriminative feature grouping.

Importing the package registers ``timm.create_model('group_softmax', base_model=...)``.
"""
from .functional import (
    GROUPINGS,
    LOSS_TYPES as GSL_TYPES,
    contiguous_assignment,
    discriminative_assignment,
    discriminativity,
    group_logits,
    group_softmax_loss,
    make_assignment,
    random_assignment,
)
from .head import (
    GroupSoftmaxHead,
    GroupSoftmaxOutput,
    UnsupportedModelError,
    convert_model,
    get_logits,
    is_converted,
    unconvert_model,
)
from .loss import GroupSoftmaxLoss
from .loss_factory import LOSS_TYPES, create_classification_loss
from .task import GroupSoftmaxTask
from . import registry as _registry  # noqa: F401  (registers the 'group_softmax' entrypoint)

__version__ = '0.1.0'

__all__ = [
    'GROUPINGS', 'GSL_TYPES', 'LOSS_TYPES',
    'GroupSoftmaxHead', 'GroupSoftmaxLoss', 'GroupSoftmaxOutput', 'GroupSoftmaxTask', 'UnsupportedModelError',
    'contiguous_assignment', 'convert_model', 'create_classification_loss', 'discriminative_assignment',
    'discriminativity', 'get_logits', 'group_logits', 'group_softmax_loss', 'is_converted',
    'make_assignment', 'random_assignment', 'unconvert_model',
]
