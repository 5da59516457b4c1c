"""Tests for ``timm_gsl.distillation``: timm's knowledge distillation with timm's losses and the group softmax loss.

* With a timm loss the factory must build timm's own task: a few SGD steps give the same losses and
  weights as the task built directly with timm.
* With the group softmax loss every result entry is checked against a slow reference written here from
  the definitions: the group softmax loss of the classifier's input, weight and bias (hooked or
  recomputed without ``timm_gsl.head``), timm's distillation terms written out by hand.
* The teacher is frozen and outside the checkpoint; the student stays a plain timm model.
* Teachers load through ``local-dir:`` (timm's ``save_for_hf`` layout) and an architecture + checkpoint.
* Bad options give one-line ValueErrors naming the option and the value, before any teacher is created: by
  its keyword, or with ``names=DISTILLATION_FLAGS`` (what train.py passes) by train.py's flag.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import save_for_hf
from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask

import timm_gsl
from timm_gsl import GroupSoftmaxLoss, GroupSoftmaxOutput
from timm_gsl.cli.train_args import DISTILLATION_FLAGS
from timm_gsl.distillation import (
    GroupSoftmaxFeatureDistillationTask, check_distillation_options, create_distillation_task,
    distillation_loss_names, resolve_loss_weights)
from timm_gsl.distillation import teacher as kd_teacher

NUM_CLASSES = 5
SIZE = 32
BATCH = 6
STEPS = 3
TASK_WEIGHT = 0.5
DISTILL_WEIGHT = 0.7
TEMPERATURE = 2.0
GSL = dict(groups=4, loss_type='II', smoothing=0.1)

TIMM_TASKS = {'logit': LogitDistillationTask, 'feature': FeatureDistillationTask, 'token': TokenDistillationTask}


# ----------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------

def cnn_student(num_classes: int = NUM_CLASSES) -> nn.Module:
    """96 pooled features, mean/std 0.5: differs from the teacher in width and normalisation."""
    return timm.create_model('test_resnet', num_classes=num_classes)


def cnn_teacher(num_classes: int = NUM_CLASSES) -> nn.Module:
    """512 pooled features, ImageNet mean/std."""
    return timm.create_model('resnet10t', num_classes=num_classes)


def token_student(num_classes: int = NUM_CLASSES) -> nn.Module:
    """A two-block distilled DeiT with a cls and a distillation token."""
    return timm.create_model('deit_tiny_distilled_patch16_224', num_classes=num_classes, img_size=SIZE, patch_size=8,
                             depth=2, embed_dim=32, num_heads=2)


def models(distill_type: str, seed: int = 0) -> Tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = token_student() if distill_type == 'token' else cnn_student()
    teacher = cnn_teacher()
    return student, teacher


def batch(seed: int = 1, n: int = BATCH) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def type_kwargs(distill_type: str) -> Dict[str, Any]:
    """The options of each distillation type as timm's task takes them."""
    if distill_type == 'logit':
        return dict(temperature=TEMPERATURE)
    if distill_type == 'token':
        return dict(temperature=TEMPERATURE)
    return {}


def factory_kwargs(distill_type: str) -> Dict[str, Any]:
    return dict(distill_type=distill_type, distill_loss_weight=DISTILL_WEIGHT, task_loss_weight=TASK_WEIGHT,
                verbose=False, **type_kwargs(distill_type))


def train(task: nn.Module, steps: int = STEPS, seed: int = 2) -> List[Dict[str, float]]:
    """SGD with momentum on a fixed batch; the float result entries of every step."""
    task.train()
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05, momentum=0.9)
    x, y = batch()
    history = []
    torch.manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        result = task(x, y)
        result['loss'].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in result.items() if isinstance(v, torch.Tensor) and v.ndim == 0})
    return history


def plain_copy(model: nn.Module, arch_model: nn.Module) -> nn.Module:
    """A fresh, never converted timm model of the same architecture holding ``model``'s weights."""
    fresh = copy.deepcopy(arch_model)
    timm_gsl.unconvert_model(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh


# ----------------------------------------------------------------------------------------------
# Options, names, weights
# ----------------------------------------------------------------------------------------------

def test_loss_names_and_weights_follow_timm():
    assert distillation_loss_names('logit') == ('task_loss', 'kd_loss')
    assert distillation_loss_names('feature') == ('task_loss', 'kd_loss')
    assert distillation_loss_names('token') == ('task_loss', 'distill_loss')
    assert resolve_loss_weights(None, None) == (1.0, 1.0)
    assert resolve_loss_weights(0.7, None) == (1.0, 0.7)
    assert resolve_loss_weights(None, 0.3) == (0.3, 0.7)
    assert resolve_loss_weights(2.0, 0.5) == (0.5, 2.0)
    # The weights timm's tasks resolve are the same.
    for distill, task in ((None, None), (0.7, None), (None, 0.3), (2.0, 0.5)):
        student, teacher = models('logit')
        built = LogitDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), verbose=False,
                                      distill_loss_weight=distill, task_loss_weight=task)
        assert (built.task_loss_weight, built.distill_loss_weight) == pytest.approx(resolve_loss_weights(distill, task))


# ----------------------------------------------------------------------------------------------
# A timm loss: exactly timm's task
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('distill_type', ['logit', 'feature', 'token'])
def test_timm_loss_equals_timm_task(distill_type):
    student, teacher = models(distill_type)
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)

    torch.manual_seed(3)  # the feature projection's initialisation
    ours = create_distillation_task(copy.deepcopy(student), loss='ce', criterion=copy.deepcopy(criterion),
                                    teacher=copy.deepcopy(teacher), **factory_kwargs(distill_type))
    torch.manual_seed(3)
    extra = dict(token=dict(distill_type='soft')).get(distill_type, {})
    theirs = TIMM_TASKS[distill_type](
        copy.deepcopy(student), copy.deepcopy(teacher), criterion=copy.deepcopy(criterion),
        distill_loss_weight=DISTILL_WEIGHT, task_loss_weight=TASK_WEIGHT, verbose=False,
        **type_kwargs(distill_type), **extra)
    assert type(ours) is type(theirs)
    if distill_type == 'feature':
        assert ours.get_trainable_module().projection is not None  # 96 -> 512

    ours_history, theirs_history = train(ours), train(theirs)
    assert ours_history == theirs_history
    assert set(ours_history[0]) == {'loss', 'task_loss', distillation_loss_names(distill_type)[1]}
    torch.testing.assert_close(ours.get_trainable_module().state_dict(), theirs.get_trainable_module().state_dict(),
                               rtol=0, atol=0)
    assert ours.get_eval_model() is ours.get_trainable_module() or distill_type == 'feature'


# ----------------------------------------------------------------------------------------------
# The group softmax loss: against a reference written from the definitions
# ----------------------------------------------------------------------------------------------

def renormalise(x: torch.Tensor, student: nn.Module, teacher: nn.Module) -> torch.Tensor:
    """The input as the teacher expects it: undo the student's normalisation, apply the teacher's."""
    s_mean, s_std = (torch.tensor(student.pretrained_cfg[k]).view(1, -1, 1, 1) for k in ('mean', 'std'))
    t_mean, t_std = (torch.tensor(teacher.pretrained_cfg[k]).view(1, -1, 1, 1) for k in ('mean', 'std'))
    return ((x * s_std + s_mean) - t_mean) / t_std


def kl_by_hand(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``T**2 / B * sum_b sum_c p_t (log p_t - log p_s)`` with tempered softmaxes."""
    p_t = torch.softmax(teacher_logits / t, dim=1)
    log_p_s = torch.log_softmax(student_logits / t, dim=1)
    return t * t * (p_t * (torch.log(p_t) - log_p_s)).sum() / student_logits.shape[0]


def smoothed_ce(logits: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    soft = torch.full_like(logits, eps / logits.shape[1])
    soft[torch.arange(len(y)), y] += 1 - eps
    return -(soft * torch.log_softmax(logits, 1)).sum(1).mean()


def reference(distill_type: str, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
              projection: Optional[nn.Module]) -> Dict[str, torch.Tensor]:
    """The loss parts computed without ``timm_gsl.head`` or the task (student in train mode, teacher in eval)."""
    gsl = GroupSoftmaxLoss(**GSL)
    student.train()
    teacher.eval()
    with torch.no_grad():
        x_t = renormalise(x, student, teacher)
        teacher_logits = teacher(x_t)
        teacher_features = teacher.forward_head(teacher.forward_features(x_t), pre_logits=True)
    if distill_type == 'token':
        student.set_distilled_training(True)
        tokens = student.forward_features(x)
        features = student.head_drop(tokens[:, 0])             # the main head's input
        logits, dist_logits = student.head(features), student.head_dist(student.head_drop(tokens[:, 1]))
        task_loss = gsl(features, y, weight=student.head.weight, bias=student.head.bias)
        part = kl_by_hand(dist_logits, teacher_logits, TEMPERATURE)
    else:
        feature_map = student.forward_features(x)
        features = student.forward_head(feature_map, pre_logits=True)   # timm's pooled pre-logits features
        logits = student.fc(features)
        task_loss = gsl(features, y, weight=student.fc.weight, bias=student.fc.bias)
        if distill_type == 'logit':
            part = kl_by_hand(logits, teacher_logits, TEMPERATURE)
        else:
            part = ((projection(features) - teacher_features) ** 2).mean()
    name = distillation_loss_names(distill_type)[1]
    return {'loss': TASK_WEIGHT * task_loss + DISTILL_WEIGHT * part, 'task_loss': task_loss, name: part,
            'output': logits, 'softmax_loss': smoothed_ce(logits.detach(), y, GSL['smoothing'])}


@pytest.mark.parametrize('distill_type', ['logit', 'feature', 'token'])
def test_gsl_matches_reference(distill_type):
    student, teacher = models(distill_type)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    task = create_distillation_task(student, loss='gsl', criterion=GroupSoftmaxLoss(**GSL), teacher=teacher,
                                    grouping_statistics=True, **factory_kwargs(distill_type))
    assert type(task).__name__ == f'GroupSoftmax{distill_type.capitalize()}DistillationTask'
    assert isinstance(task, TIMM_TASKS[distill_type])
    projection = None
    if distill_type == 'feature':
        projection = copy.deepcopy(task.get_trainable_module().projection)
        assert projection is not None

    x, y = batch()
    task.train()
    assert not task.teacher.training and not any(m.training for m in task.teacher.modules())
    result = task(x, y)
    expect = reference(distill_type, ref_student, ref_teacher, x, y, projection)

    assert set(result) == set(expect) | {'grouping_statistics'}
    for key in expect:
        torch.testing.assert_close(result[key], expect[key], msg=key)
    torch.testing.assert_close(result['loss'], TASK_WEIGHT * result['task_loss']
                               + DISTILL_WEIGHT * result[distillation_loss_names(distill_type)[1]])
    assert not result['softmax_loss'].requires_grad
    stats = result['grouping_statistics']
    assert stats.group_loss.shape == (GSL['groups'],)
    torch.testing.assert_close(stats.group_loss.sum(), result['task_loss'].detach())  # Type-II: their sum

    # The gradients of both reach the student (and projection), never the teacher.
    result['loss'].backward()
    expect['loss'].backward()
    ours = dict(task.get_eval_model().named_parameters())
    for name, param in ref_student.named_parameters():
        if param.grad is None:
            assert ours[name].grad is None or not ours[name].grad.any(), name
            continue
        torch.testing.assert_close(ours[name].grad, param.grad, msg=name)
    if projection is not None:
        torch.testing.assert_close(task.get_trainable_module().projection.weight.grad, projection.weight.grad)
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert all(p.grad is None for p in ref_teacher.parameters())


@pytest.mark.parametrize('distill_type', ['logit', 'feature', 'token'])
def test_gsl_student_stays_a_plain_timm_model(distill_type):
    student, teacher = models(distill_type)
    arch_model = copy.deepcopy(student)
    task = create_distillation_task(student, loss='gsl', criterion=None, teacher=teacher,
                                    **factory_kwargs(distill_type))
    history = train(task, steps=2)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert history[1]['loss'] != history[0]['loss']

    eval_model = task.get_eval_model()
    assert eval_model is student
    if distill_type == 'feature':
        assert task.get_trainable_module().student is student
    else:
        assert task.get_trainable_module() is student
    # The checkpoint holds the student only, with the plain model's keys; the projection is task state.
    state = task.get_checkpoint_state()
    assert set(state['state_dict']) == set(arch_model.state_dict())
    assert not any(k.startswith('teacher') for k in task.get_trainable_module().state_dict())
    assert ('task_state' in state) is (distill_type == 'feature')
    task.setup_ema(decay=0.5)
    task.update_ema()
    assert task.get_eval_model(ema=True) is not None
    assert set(task.get_checkpoint_state(ema=True)['state_dict_ema']) == set(arch_model.state_dict())

    # In eval mode nothing of the training hooks shows: the output is the plain model's.
    task.eval()
    x, _ = batch(seed=5)
    plain = plain_copy(student, arch_model).eval()
    with torch.no_grad():
        out = eval_model(x)
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match='task.train'):
        task(*batch())


def test_gsl_task_converts_and_teacher_is_frozen():
    student, teacher = models('logit')
    task = create_distillation_task(student, loss='gsl', criterion=GroupSoftmaxLoss(groups=2), teacher=teacher,
                                    verbose=False)
    assert timm_gsl.is_converted(student)
    task.train()
    assert student.training and not teacher.training
    assert isinstance(student(batch()[0]), GroupSoftmaxOutput)
    assert not any(p.requires_grad for p in teacher.parameters())
    # The optimiser sees the student's parameters only.
    trainable = {id(p) for p in task.get_trainable_module().parameters()}
    assert trainable == {id(p) for p in student.parameters()}
    assert not trainable & {id(p) for p in teacher.parameters()}


def test_token_gsl_unconverts_a_converted_student():
    student, teacher = models('token')
    timm_gsl.convert_model(student)
    task = create_distillation_task(student, loss='gsl', criterion=None, teacher=teacher,
                                    **factory_kwargs('token'))
    assert not timm_gsl.is_converted(student)
    history = train(task, steps=1)
    assert set(history[0]) == {'loss', 'task_loss', 'distill_loss', 'softmax_loss'}


def test_token_hard_targets_use_the_teacher_argmax():
    student, teacher = models('token')
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher).eval()
    task = create_distillation_task(student, loss='gsl', criterion=GroupSoftmaxLoss(**GSL), teacher=teacher,
                                    distill_type='token', token_distill_type='hard', verbose=False)
    x, y = batch()
    result = task.train()(x, y)
    ref_student.set_distilled_training(True)
    ref_student.train()
    with torch.no_grad():
        hard = ref_teacher(renormalise(x, ref_student, ref_teacher)).argmax(1)
    _, dist_logits = ref_student(x)
    torch.testing.assert_close(result['distill_loss'], F.cross_entropy(dist_logits, hard))


# ----------------------------------------------------------------------------------------------
# Teachers from disk
# ----------------------------------------------------------------------------------------------

TEACHER_MEAN, TEACHER_STD = [0.286] * 3, [0.353] * 3


@pytest.fixture(scope='module')
def saved_teacher(tmp_path_factory) -> Tuple[str, nn.Module]:
    """A teacher trained two steps and saved in timm's Hugging Face layout (model.safetensors + config.json)."""
    torch.manual_seed(7)
    teacher = cnn_teacher()
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.1)
    x, y = batch(seed=8)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    folder = str(tmp_path_factory.mktemp('teacher'))
    save_for_hf(teacher, folder, safe_serialization=True,
                data_config=dict(input_size=(3, SIZE, SIZE), mean=TEACHER_MEAN, std=TEACHER_STD))
    assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
    return folder, teacher.eval()


@pytest.mark.parametrize('loss', ['ce', 'gsl'])
def test_local_dir_teacher(saved_teacher, loss):
    folder, trained = saved_teacher
    student, _ = models('logit')
    criterion = GroupSoftmaxLoss(**GSL) if loss == 'gsl' else nn.CrossEntropyLoss()
    task = create_distillation_task(student, loss=loss, criterion=criterion, teacher=f'local-dir:{folder}',
                                    input_mean=TEACHER_MEAN, input_std=TEACHER_STD, **factory_kwargs('logit'))
    # The saved weights and the saved normalisation arrive; the input needs no renormalisation.
    torch.testing.assert_close(task.teacher.model.state_dict(), trained.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(task.teacher.mean_kd.flatten(), torch.tensor(TEACHER_MEAN))
    x, y = batch()
    assert task.teacher.normalize_input(x, task.student_mean, task.student_std) is x
    history = train(task, steps=2)
    assert history[1]['loss'] != history[0]['loss']
    # The KD term is the one against the saved teacher's logits.
    task.train()
    student_copy = copy.deepcopy(student)
    with torch.no_grad():
        result = task(x, y)
        student_copy.train()
        out = student_copy(x)
        logits = out.logits if isinstance(out, GroupSoftmaxOutput) else out
        torch.testing.assert_close(result['kd_loss'], kl_by_hand(logits, trained(x), TEMPERATURE))


@pytest.mark.parametrize('loss', ['ce', 'gsl'])
def test_local_dir_teacher_feature(saved_teacher, loss):
    folder, _ = saved_teacher
    student, _ = models('feature')
    criterion = GroupSoftmaxLoss(**GSL) if loss == 'gsl' else nn.CrossEntropyLoss()
    task = create_distillation_task(student, loss=loss, criterion=criterion, teacher=f'local-dir:{folder}',
                                    **factory_kwargs('feature'))
    assert task.get_trainable_module().projection.out_features == 512
    history = train(task, steps=2)
    assert history[1]['loss'] != history[0]['loss']


def test_architecture_and_checkpoint_teacher(saved_teacher, tmp_path):
    _, trained = saved_teacher
    path = str(tmp_path / 'teacher.pth')
    torch.save(trained.state_dict(), path)
    student, _ = models('logit')
    task = create_distillation_task(student, loss='gsl', criterion=None, teacher='resnet10t',
                                    teacher_pretrained_path=path, **factory_kwargs('logit'))
    torch.testing.assert_close(task.teacher.model.state_dict(), trained.state_dict(), rtol=0, atol=0)
    train(task, steps=2)

    # The same checkpoint for a student with other classes is refused before the teacher is built.
    with pytest.raises(ValueError) as info:
        create_distillation_task(cnn_student(3), loss='gsl', criterion=None, teacher='resnet10t',
                                 teacher_pretrained_path=path, verbose=False, names=DISTILLATION_FLAGS)
    assert str(info.value).startswith("--kd-model-name resnet10t has 5 classes but the student has 3;")


# ----------------------------------------------------------------------------------------------
# Mistakes: one-line ValueErrors naming the flag and the value, before the teacher is created
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def no_teacher_creation(monkeypatch):
    """Fail the test if a teacher gets created (the refusals must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError('a teacher was created before the options were checked')
    monkeypatch.setattr(kd_teacher, '_create_teacher', refuse)


BAD = [
    (dict(teacher='resnet1000'), ["--kd-model-name 'resnet1000': timm has no such model;", 'local-dir:']),
    (dict(teacher='some/folder'), ["--kd-model-name 'some/folder'", 'local-dir:some/folder']),
    (dict(teacher='local-dir:/no/such/folder'), ["--kd-model-name 'local-dir:/no/such/folder'", 'not a folder']),
    (dict(teacher='resnet10t'), ['--kd-model-name resnet10t has 1000 classes but the student has 5;']),
    (dict(teacher='test_resnet', teacher_pretrained_path='/no/such.pth'), ["--kd-pretrained-path '/no/such.pth'"]),
    (dict(distill_type='attention'), ["--kd-distill-type 'attention'", "'logit', 'feature', 'token'"]),
    (dict(kd_loss_type='mse'), ["--kd-loss-type 'mse'", "'kl'"]),
    (dict(token_distill_type='hard'), ["--kd-token-distill-type 'hard'", 'token']),
    (dict(distill_type='token', token_distill_type='medium'), ["--kd-token-distill-type 'medium'", "'soft', 'hard'"]),
    (dict(distill_type='token'), ['--kd-distill-type token', 'no distillation head']),
    (dict(student_feature_dim=64), ['--kd-student-feature-dim 64', 'feature']),
    (dict(distill_type='feature', teacher_feature_dim=0), ['--kd-teacher-feature-dim 0', 'positive integer']),
    (dict(distill_type='feature', temperature=2.0), ['--kd-temperature 2.0', 'no temperature']),
    (dict(temperature=0.0), ['--kd-temperature 0.0', 'positive']),
    (dict(distill_type='token', token_distill_type='hard', temperature=1.0), ['--kd-temperature 1.0', 'hard']),
    (dict(task_loss_weight=1.5), ['--task-loss-weight 1.5', '--distill-loss-weight']),
    (dict(distill_loss_weight=-1.0), ['--distill-loss-weight -1.0', '>= 0']),
    (dict(loss='focal'), ["--loss 'focal'", 'gsl']),
    (dict(loss='ce', criterion=GroupSoftmaxLoss()), ['--loss ce', 'GroupSoftmaxLoss']),
    (dict(loss='gsl', criterion=nn.CrossEntropyLoss()), ['--loss gsl', 'CrossEntropyLoss']),
]


@pytest.mark.parametrize('options,fragments', BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_options_are_refused_in_one_line(no_teacher_creation, options, fragments):
    options = dict(dict(loss='gsl', criterion=None, teacher=cnn_teacher(), verbose=False, names=DISTILLATION_FLAGS),
                   **options)
    with pytest.raises(ValueError) as info:
        create_distillation_task(cnn_student(), **options)
    message = str(info.value)
    assert '\n' not in message
    for fragment in fragments:
        assert fragment in message, message


def _keywords(fragment: str) -> str:
    """A fragment of a train.py message as the library writes it without ``names``: each flag as its keyword."""
    for key, flag in sorted(DISTILLATION_FLAGS.items(), key=lambda item: -len(item[1])):
        fragment = fragment.replace(flag, key)
    return fragment


@pytest.mark.parametrize('options,fragments', BAD, ids=[str(i) for i in range(len(BAD))])
def test_without_names_the_messages_name_keywords(no_teacher_creation, options, fragments):
    options = dict(dict(loss='gsl', criterion=None, teacher=cnn_teacher(), verbose=False), **options)
    with pytest.raises(ValueError) as info:
        create_distillation_task(cnn_student(), **options)
    message = str(info.value)
    assert '--' not in message, message
    for fragment in fragments:
        assert _keywords(fragment) in message, message


def test_names_turns_keywords_into_flags():
    # A teacher name timm does not have: the teacher and, in the advice, the checkpoint option.
    with pytest.raises(ValueError) as info:
        check_distillation_options(loss='gsl', teacher='resnet1000')
    message = str(info.value)
    assert message.startswith("teacher 'resnet1000': timm has no such model;"), message
    assert '(teacher_pretrained_path)' in message and '--' not in message, message
    with pytest.raises(ValueError) as info:
        check_distillation_options(loss='gsl', teacher='resnet1000', names=DISTILLATION_FLAGS)
    message = str(info.value)
    assert message.startswith("--kd-model-name 'resnet1000': timm has no such model;"), message
    assert '(--kd-pretrained-path)' in message, message
    # The loss, named inside a message about another option.
    with pytest.raises(ValueError, match=r"^distill_type feature with loss gsl: the student has 2 classifier"):
        create_distillation_task(token_student(), loss='gsl', criterion=None, teacher=cnn_teacher(),
                                 distill_type='feature', verbose=False)
    with pytest.raises(ValueError, match=r"^distill_type 'attention': expected one of"):
        distillation_loss_names('attention')
    with pytest.raises(ValueError, match=r"^--kd-distill-type 'attention': expected one of"):
        distillation_loss_names('attention', names=DISTILLATION_FLAGS)
    # A partial mapping: the keywords it has are named its way, the others as themselves.
    with pytest.raises(ValueError, match=r"^kd_temperature 0.0: expected a positive number"):
        check_distillation_options(loss='gsl', teacher=cnn_teacher(), temperature=0.0,
                                   names=dict(temperature='kd_temperature'))
    with pytest.raises(ValueError, match=r"^kd_loss_type 'mse': .* token distillation token_distill_type\)"):
        check_distillation_options(loss='gsl', teacher=cnn_teacher(), kd_loss_type='mse',
                                   names=dict(temperature='kd_temperature'))


def test_feature_task_built_directly_names_its_own_arguments():
    with pytest.raises(ValueError, match=r'^GroupSoftmaxFeatureDistillationTask: the student has 2 classifier heads;'):
        GroupSoftmaxFeatureDistillationTask(token_student(), cnn_teacher(), verbose=False)
    with pytest.raises(ValueError, match=r'^student_feature_dim 64: .* 96 elements \(leave student_feature_dim unset'):
        GroupSoftmaxFeatureDistillationTask(cnn_student(), cnn_teacher(), student_feature_dim=64, verbose=False)


def test_teacher_module_with_other_classes_is_refused(no_teacher_creation):
    with pytest.raises(ValueError, match=r'^--kd-model-name .* has 7 classes but the student has 5;'):
        create_distillation_task(cnn_student(), loss='ce', criterion=None, teacher=cnn_teacher(7), verbose=False,
                                 names=DISTILLATION_FLAGS)
    # Feature distillation does not use the teacher's classifier.
    check_distillation_options(loss='ce', teacher=cnn_teacher(7), distill_type='feature', num_classes=5)


def test_local_dir_teacher_with_other_classes_is_refused(saved_teacher, no_teacher_creation):
    folder, _ = saved_teacher
    with pytest.raises(ValueError) as info:
        create_distillation_task(cnn_student(3), loss='gsl', criterion=None, teacher=f'local-dir:{folder}',
                                 verbose=False, names=DISTILLATION_FLAGS)
    assert str(info.value).startswith(f'--kd-model-name local-dir:{folder} has 5 classes but the student has 3;')
    with pytest.raises(ValueError, match='has no config.json'):
        check_distillation_options(loss='gsl', teacher=f'local-dir:{os.path.dirname(folder)}')


def test_feature_gsl_needs_one_classifier(no_teacher_creation):
    with pytest.raises(ValueError, match=r"^--kd-distill-type feature with --loss gsl: the student has 2 classifier"):
        create_distillation_task(token_student(), loss='gsl', criterion=None, teacher=cnn_teacher(),
                                 distill_type='feature', verbose=False, names=DISTILLATION_FLAGS)
    with pytest.raises(ValueError, match=r"^--kd-student-feature-dim 64: .* classifier's input, which has 96"):
        create_distillation_task(cnn_student(), loss='gsl', criterion=None, teacher=cnn_teacher(),
                                 distill_type='feature', student_feature_dim=64, verbose=False,
                                 names=DISTILLATION_FLAGS)


def test_normalisation_that_cannot_reach_the_teacher_is_refused():
    """A 1-channel student whose statistics differ from a teacher's 3-value ones: timm would broadcast to 3 channels."""
    student = timm.create_model('test_resnet', num_classes=NUM_CLASSES, in_chans=1)
    teacher = timm.create_model('test_resnet', num_classes=NUM_CLASSES, in_chans=1)
    with pytest.raises(ValueError, match=r'^--kd-model-name: the teacher mean has 3 values but the student takes 1'):
        create_distillation_task(student, loss='gsl', criterion=None, teacher=teacher, input_mean=[0.2],
                                 input_std=[0.3], verbose=False, names=DISTILLATION_FLAGS)
    # The same statistics need no renormalisation, and train.
    task = create_distillation_task(student, loss='gsl', criterion=None, teacher=teacher, verbose=False)
    x, y = batch()
    result = task.train()(x[:, :1], y)
    assert torch.isfinite(result['loss'])
