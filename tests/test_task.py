"""Tests for ``timm_gsl.task.GroupSoftmaxTask`` with timm's machinery: DDP, torch.compile, EMA, checkpoints."""
from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import timm_gsl
from timm.utils.model import unwrap_model
from timm_gsl import GroupSoftmaxLoss, GroupSoftmaxOutput, GroupSoftmaxTask

from _timm_cases import Case, ClassifierTap, batch

# A BatchNorm-free model (LayerNorm only, no dropout by default), so that a batch split over ranks
# computes exactly what the whole batch computes in one process.
VIT = Case('test_vit', dict(img_size=32, patch_size=8), size=32)
GROUPS = 4
STEPS = 3
LR = 0.1


def make_task(model: torch.nn.Module, **criterion_kwargs) -> GroupSoftmaxTask:
    kwargs = dict(gsl_groups=GROUPS, gsl_type='II')
    kwargs.update(criterion_kwargs)
    return GroupSoftmaxTask(model, criterion_kwargs=kwargs, verbose=False)


def train_steps(task: GroupSoftmaxTask, images: torch.Tensor, target: torch.Tensor, steps: int) -> List[float]:
    """Plain SGD with momentum on a fixed batch; returns the loss of every step."""
    task.train()
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=LR, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = task(images, target)['loss']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
    return losses


def initial_state(seed: int = 0) -> Dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return VIT.create().state_dict()


def vit_from(state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    model = VIT.create()
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------------------------
# The task's result
# ----------------------------------------------------------------------------------------------

def test_task_result_holds_group_loss_logits_and_softmax_loss():
    model = vit_from(initial_state())
    task = make_task(model).train()
    tap = ClassifierTap(model, VIT.arch)
    images, target = batch(VIT, n=6)
    result = task(images, target)
    features, weight, bias = tap.linear()
    expected = timm_gsl.group_softmax_loss(features, weight, bias, target, groups=GROUPS, loss_type='II')
    torch.testing.assert_close(result['loss'], expected, rtol=1e-5, atol=1e-6)
    assert type(result['output']) is torch.Tensor
    torch.testing.assert_close(result['output'], F.linear(features, weight, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result['softmax_loss'], F.cross_entropy(result['output'].detach(), target))
    assert not result['softmax_loss'].requires_grad
    # Proposition 1: the group loss bounds the softmax loss from above.
    assert result['loss'].detach().item() >= result['softmax_loss'].item()


def test_task_softmax_loss_uses_label_smoothing_and_soft_targets():
    model = vit_from(initial_state())
    images, target = batch(VIT, n=6)
    smoothed = make_task(model, smoothing=0.1).train()(images, target)
    torch.testing.assert_close(
        smoothed['softmax_loss'], F.cross_entropy(smoothed['output'].detach(), target, label_smoothing=0.1))

    soft = torch.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(4)), -1)
    mixed = make_task(vit_from(initial_state()), soft_targets=True).train()(images, soft)
    torch.testing.assert_close(mixed['softmax_loss'], F.cross_entropy(mixed['output'].detach(), soft))


def test_task_refuses_eval_mode_forward_and_double_criterion():
    task = make_task(vit_from(initial_state()))
    images, target = batch(VIT, n=2)
    with pytest.raises(RuntimeError, match='task.train()'):
        task.eval()(images, target)
    with pytest.raises(ValueError, match='criterion_kwargs'):
        GroupSoftmaxTask(VIT.create(), criterion=GroupSoftmaxLoss(), criterion_kwargs=dict(gsl_groups=2))


def test_checkpoint_state_is_a_plain_timm_state_dict():
    task = make_task(vit_from(initial_state()))
    images, target = batch(VIT, n=4)
    train_steps(task, images, target, steps=1)
    state = task.get_checkpoint_state()['state_dict']
    plain = VIT.create()
    assert list(state) == list(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    task.eval()
    with torch.no_grad():
        assert torch.equal(task.get_eval_model()(images), plain.eval()(images))


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel (gloo, CPU, two processes)
# ----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, state: Dict[str, torch.Tensor], images: torch.Tensor,
                target: torch.Tensor, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        'gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60))
    try:
        task = make_task(vit_from(state)).prepare_distributed()
        assert isinstance(task.trainable_module, torch.nn.parallel.DistributedDataParallel)
        local = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
        losses = train_steps(task, images[local], target[local], STEPS)
        result = dict(state=unwrap_model(task.trainable_module).state_dict(), losses=losses)
        path = os.path.join(out_dir, f'rank{rank}.pt')
        torch.save(result, path + '.tmp')
        os.replace(path + '.tmp', path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_on_the_global_batch(tmp_path):
    state = initial_state()
    images, target = batch(VIT, n=8, seed=5)

    context = mp.start_processes(
        _ddp_worker, args=(2, _free_port(), state, images, target, str(tmp_path)), nprocs=2, join=False,
        start_method='spawn')
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail('DDP workers did not finish within 240 s')

    single = make_task(vit_from(state))
    single_losses = train_steps(single, images, target, STEPS)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    # Each rank's loss is the mean over its half; their mean is the global-batch loss.
    for step in range(STEPS):
        assert (ranks[0]['losses'][step] + ranks[1]['losses'][step]) / 2 == pytest.approx(
            single_losses[step], rel=1e-5)
    want = single.trainable_module.state_dict()
    for name, value in want.items():
        torch.testing.assert_close(ranks[0]['state'][name], value, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(ranks[1]['state'][name], ranks[0]['state'][name], rtol=0, atol=0, msg=name)
    assert not torch.equal(want['head.weight'], state['head.weight'])  # the steps did move the weights


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_task_trains_like_the_eager_task():
    state = initial_state()
    images, target = batch(VIT, n=4, seed=6)
    eager = make_task(vit_from(state))
    compiled = make_task(vit_from(state))
    eval_model = compiled.compile()
    assert eval_model is compiled.get_eval_model()

    eager_losses = train_steps(eager, images, target, STEPS)
    compiled_losses = train_steps(compiled, images, target, STEPS)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    got = unwrap_model(compiled.trainable_module).state_dict()
    for name, value in eager.trainable_module.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-3, atol=1e-5, msg=name)
    assert list(got) == list(VIT.create().state_dict())  # compiled wrapper leaks no key prefix

    # The compiled eval model is the plain model: logits, not a GroupSoftmaxOutput.
    compiled.eval()
    with torch.no_grad():
        out = compiled.get_eval_model()(images)
        assert type(out) is torch.Tensor
        torch.testing.assert_close(out, eager.eval().get_eval_model()(images), rtol=1e-3, atol=1e-4)


# Every grouping on both architectures; Type I and II, statistics and soft targets each on both.
GRAPH_CASES = [
    ('resnet10t', 'discriminative', 'II', True, False), ('resnet10t', 'random', 'I', False, True),
    ('resnet10t', 'contiguous', 'II', False, False), ('resnet10t', 'zero-aware', 'I', True, True),
    ('test_vit', 'discriminative', 'I', False, True), ('test_vit', 'random', 'II', True, False),
    ('test_vit', 'contiguous', 'I', True, True), ('test_vit', 'zero-aware', 'II', False, False),
]


@pytest.mark.slow
@pytest.mark.parametrize('model_name, grouping, loss_type, statistics, soft', GRAPH_CASES)
def test_model_and_group_softmax_loss_trace_as_one_graph(model_name, grouping, loss_type, statistics, soft):
    import timm
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8) if model_name == 'test_vit' else {}
    task = GroupSoftmaxTask(timm.create_model(model_name, num_classes=5, **kwargs), verbose=False,
                            grouping_statistics=statistics,
                            criterion_kwargs=dict(gsl_groups=GROUPS, gsl_type=loss_type, gsl_grouping=grouping))
    task.train()
    images = torch.randn(4, 3, 32, 32)
    target = torch.softmax(torch.randn(4, 5), -1) if soft else torch.tensor([0, 3, 1, 4])
    task(images, target)  # the head's one-time check of its classifier, outside the traced steps
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x, y: task(x, y)['loss'])(images, target)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        [str(reason.reason)[:300] for reason in explained.break_reasons]
    # Forward and backward compiled together (aot_eager: AOTAutograd's joint graph, no code generation) give
    # the eager loss and gradients. The random grouping draws from the global generator: same seed for both.
    parameters = list(task.get_trainable_module().parameters())

    def loss_and_grads(step):
        torch.manual_seed(1)
        loss = step(images, target)
        return [loss.detach()] + list(torch.autograd.grad(loss, parameters))

    torch._dynamo.reset()
    eager = loss_and_grads(lambda x, y: task(x, y)['loss'])
    compiled = loss_and_grads(torch.compile(lambda x, y: task(x, y)['loss'], backend='aot_eager', fullgraph=True))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)



# ----------------------------------------------------------------------------------------------
# Model EMA (timm.utils.ModelEmaV3 through the task)
# ----------------------------------------------------------------------------------------------

def test_ema_tracks_the_trained_model_and_is_plain_in_eval():
    state = initial_state()
    images, target = batch(VIT, n=4, seed=7)
    task = make_task(vit_from(state))
    decay = 0.5
    ema = task.setup_ema(decay=decay)
    assert task.has_ema()

    train_steps(task, images, target, steps=1)
    task.update_ema()
    trained = task.trainable_module.state_dict()
    for name, value in ema.module.state_dict().items():
        expected = decay * state[name] + (1 - decay) * trained[name] if value.is_floating_point() else trained[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)

    # timm validates with the model in eval mode (task.train() also flips the EMA submodule to train).
    eval_model = task.get_eval_model(ema=True).eval()
    plain = VIT.create().eval()
    plain.load_state_dict(task.get_checkpoint_state(ema=True)['state_dict_ema'], strict=True)
    with torch.no_grad():
        out = unwrap_model(eval_model)(images)
    assert type(out) is torch.Tensor
    assert torch.equal(out, plain(images))

    # The EMA copy's hooks belong to the copy: in training mode it would use its own classifier.
    output = ema.module.train()(images)
    ema.module.eval()
    assert isinstance(output, GroupSoftmaxOutput)
    assert output.weight.data_ptr() == ema.module.head.weight.data_ptr()
    assert output.weight.data_ptr() != task.trainable_module.head.weight.data_ptr()
