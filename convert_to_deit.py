#!/usr/bin/env python
"""Convert a MoCo v3 pretraining checkpoint's backbone for fine-tuning elsewhere: a ViT to the DeiT / timm
format ``{'model': state_dict}``, a ResNet to torchvision's, and either to a timm model folder.

    python convert_to_deit.py --input vit-b-300ep.pth.tar --output vit-b-300ep-deit.pth

``--output`` keeps the base encoder's backbone (``module.base_encoder.*`` minus the projector; Momentum²
Teacher: the teacher), with the prefix stripped. A ViT's file is the original's: it loads with
``strict=False`` into a DeiT/timm ViT of the same size, missing only ``head.weight`` and ``head.bias``
(our ViT-S has 12 heads, DeiT-S 6: build it with ``num_heads=12``); ``transfer/finetune.py --pretrained``
reads it, and so does the DeiT repo. A ResNet's is a plain state_dict that
``torchvision.models.resnet50()`` loads missing only ``fc.*`` (detectron2's convert-torchvision-to-d2.py
reads it).

The timm folder (``--timm-dir``, by default next to ``--output``) holds ``config.json`` and
``model.safetensors`` as ``timm.models.save_for_hf`` writes them, so that
``timm.create_model('local-dir:DIR', pretrained=True, num_classes=N)`` builds our network, 12 heads
included, with our weights (moco/export.py says what it records and how it is checked).
"""
import os
import sys

from moco import cli, export
from moco.checkpoint import read_backbone, save_checkpoint
from moco.errors import UserError


def get_args_parser():
    parser = cli.parser('Convert a MoCo v3 pretrained backbone: a ViT to DeiT format, a ResNet to torchvision '
                        'format, and either to a timm model folder')
    parser.add_argument('--input', required=True, type=cli.path, metavar='PATH',
                        help='MoCo v3 pretraining checkpoint (ours or the original release)')
    parser.add_argument('--output', required=True, type=cli.path, metavar='PATH',
                        help="where to write the backbone: a ViT's DeiT-format checkpoint {'model': state_dict}, a "
                             "ResNet's torchvision-format state_dict (folders are created)")
    parser.add_argument('--timm-dir', type=cli.path, metavar='DIR',
                        help="where to write the timm folder (config.json, model.safetensors) that "
                             "timm.create_model('local-dir:DIR', pretrained=True, num_classes=N) builds with our "
                             "features; an earlier export there is replaced (default: --output without its "
                             "extension + _timm, e.g. vit-b-deit.pth -> vit-b-deit_timm)")
    parser.add_argument('--no-timm', action='store_true', help='write --output only, no timm folder')
    return parser


def default_timm_dir(output):
    """--output without its extension(s) + ``_timm``: ``vit-b-deit.pth`` -> ``vit-b-deit_timm``."""
    base = output
    for ext in ('.tar', '.pth', '.pt', '.bin'):
        if base.endswith(ext) and len(base) > len(ext):
            base = base[:-len(ext)]
    return base + '_timm'


def convert(input_path):
    """The backbone of a MoCo pretraining checkpoint (a UserError for other files) and what --output holds:
    a ViT's ``{'model': state_dict}``, a ResNet's state_dict."""
    backbone = read_backbone(input_path)
    return backbone, export.backbone_file(backbone.state)


def plan_timm_folder(backbone, explicit):
    """(our network, TimmPlan) of the timm folder, or None with a note when timm cannot build this network
    and --timm-dir was not asked for (asked for, it is an error)."""
    size = export.image_size(backbone)
    try:
        try:
            ours = export.our_network(backbone, size) if backbone.arch else None
        except UserError as e:
            raise export.NoTimmModel(f'{e}: no timm folder') from None
        return ours, export.timm_plan(backbone, ours, size)
    except export.NoTimmModel as e:
        if explicit:
            raise
        print(f'note: {e}')
        return None


def main(args):
    try:
        if args.timm_dir and args.no_timm:
            raise UserError('--timm-dir and --no-timm contradict each other: give one of them')
        backbone, converted = convert(args.input)
        timm_dir = None if args.no_timm else (args.timm_dir or default_timm_dir(args.output))
        planned = plan_timm_folder(backbone, explicit=bool(args.timm_dir)) if timm_dir else None
        if planned:   # both outputs checked before either is written
            try:
                os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            except OSError as e:   # save_checkpoint's message
                raise UserError(f'cannot create the folder of {args.output}: {e.strerror or e}') from None
            export.check_folder_target(timm_dir)
        save_checkpoint(converted, args.output)
        print(export.describe_backbone_file(backbone, args.output))
        if planned:
            ours, plan = planned
            diff = export.write_timm_folder(backbone, ours, plan, timm_dir)
            args_text = ', '.join(f'{k}={v}' for k, v in plan.model_args.items())
            print(f'=> wrote {timm_dir}: timm {plan.architecture}' + (f'({args_text})' if args_text else '')
                  + f' with these weights, checked to compute our features (max |difference| {diff:.1g} on a '
                  'random batch)')
            if not export.timm_reads_local_dir():
                print(f"note: timm {export.timm_version()} cannot read 'local-dir:' folders (timm >= "
                      f"{export.LOCAL_DIR_TIMM} can); this line loads the folder:")
            print(export.load_line(timm_dir, plan))
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
