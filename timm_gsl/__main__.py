"""``python -m timm_gsl <command>``: the package's own commands.

Commands:
    push    publish a checkpoint of ``train.py`` to the Hugging Face Hub as a plain timm model.
    export  write the same files (weights, config, model card) into a local folder (``local-dir:`` loadable).

Examples:
    python -m timm_gsl push output/train/run/model_best.pth.tar --repo-id my-org/resnet50-gsl
    python -m timm_gsl export output/train/run/model_best.pth.tar exported/resnet50-gsl
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Dict, Optional, Sequence

__all__ = ['get_args_parser', 'main']

_logger = logging.getLogger('timm_gsl')


def _add_publish_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--use-ema', action='store_true', default=False,
                        help='publish the checkpoint\'s EMA weights (state_dict_ema) when it has them')
    parser.add_argument('--license', default='apache-2.0', metavar='ID',
                        help='Hub license id written in the model card (default: apache-2.0)')


def get_args_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m timm_gsl``, one sub-parser per command.

    Returns:
        A new parser.
    """
    from .hub import repo_id_type

    parser = argparse.ArgumentParser(prog='python -m timm_gsl', description='timm-gsl commands.')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    push = commands.add_parser(
        'push', help='publish a train.py checkpoint to the Hugging Face Hub',
        description='Publish a train.py checkpoint to the Hugging Face Hub as a plain timm model: '
                    'model.safetensors, config.json, README.md (model card) and the learning curves.')
    push.add_argument('checkpoint', metavar='CHECKPOINT', help='checkpoint file, e.g. model_best.pth.tar')
    push.add_argument('--repo-id', required=True, type=repo_id_type, metavar='ORG/NAME', help='the Hub repo')
    push.add_argument('--revision', default=None, metavar='BRANCH',
                      help='branch to commit to, created when missing (default: main)')
    push.add_argument('--private', action='store_true', default=False, help='create the repo private')
    push.add_argument('--commit-message', default=None, metavar='TEXT', help='commit summary')
    push.add_argument('--token', default=None, metavar='TOKEN',
                      help='Hub token (default: HF_TOKEN or the token saved by `hf auth login`)')
    _add_publish_args(push)

    export = commands.add_parser(
        'export', help='write the files push would publish into a local folder',
        description='Write model.safetensors, config.json, README.md and the learning curves of a train.py '
                    'checkpoint into a new folder, loadable with timm.create_model("local-dir:FOLDER").')
    export.add_argument('checkpoint', metavar='CHECKPOINT', help='checkpoint file, e.g. model_best.pth.tar')
    export.add_argument('output_dir', metavar='FOLDER', help='folder to create (must not exist or be empty)')
    export.add_argument('--repo-id', default=None, type=repo_id_type, metavar='ORG/NAME',
                        help='the repo the model card names (default: local/<folder name>)')
    _add_publish_args(export)
    return parser


def _push(args: argparse.Namespace) -> None:
    from .hub import push_checkpoint
    url = push_checkpoint(args.checkpoint, args.repo_id, revision=args.revision, private=args.private,
                          commit_message=args.commit_message, token=args.token, use_ema=args.use_ema,
                          license=args.license)
    print(f'Published {args.checkpoint} to {args.repo_id}: {url}')


def _export(args: argparse.Namespace) -> None:
    from .hub import export_checkpoint
    files = export_checkpoint(args.checkpoint, args.output_dir, repo_id=args.repo_id, use_ema=args.use_ema,
                              license=args.license)
    print(f'Exported {args.checkpoint} to {args.output_dir}: {", ".join(files)}')


_COMMANDS: Dict[str, Callable[[argparse.Namespace], None]] = {'push': _push, 'export': _export}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when the command failed (the message is on stderr). A command
        line that does not parse exits with status 2.
    """
    from .hub import HubPublishError

    logging.basicConfig(level=logging.INFO, format='%(message)s')
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        _COMMANDS[args.command](args)
    except (ValueError, HubPublishError) as e:
        print(f'python -m timm_gsl {args.command}: error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
