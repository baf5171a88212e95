#!/usr/bin/env python
"""Convert a MoCo v3 ViT pretraining checkpoint to the DeiT / timm format ``{'model': state_dict}``.

    python convert_to_deit.py --input vit-b-300ep.pth.tar --output vit-b-300ep-deit.pth

Keeps the base encoder's backbone (``module.base_encoder.*`` minus the projector ``head``), with the
prefix stripped: the keys of timm's VisionTransformer. The file loads with ``strict=False`` into a
DeiT/timm ViT of the same size, missing only ``head.weight`` and ``head.bias`` (our ViT-S has 12
heads; DeiT-S has 6). ``transfer/finetune.py --pretrained`` reads it, and so does the DeiT repo
(``--resume``, with ``load_state_dict(..., strict=False)``).
"""
import sys

from moco import cli
from moco.checkpoint import read_backbone, save_checkpoint
from moco.errors import UserError


def get_args_parser():
    parser = cli.parser('Convert a MoCo v3 pretrained ViT to DeiT format')
    parser.add_argument('--input', required=True, type=cli.path, metavar='PATH',
                        help='MoCo v3 pretraining checkpoint (ours or the original release)')
    parser.add_argument('--output', required=True, type=cli.path, metavar='PATH',
                        help='where to write the DeiT-format checkpoint (folders are created)')
    return parser


def convert(input_path):
    """The DeiT-format dict of a MoCo ViT checkpoint; a ResNet or non-MoCo file is a UserError."""
    state, arch, _ = read_backbone(input_path)
    if not any(k.startswith('patch_embed.') for k in state) or not any(k.startswith('blocks.') for k in state):
        what = f'a {arch} encoder' if arch else 'an encoder without patch_embed/blocks weights'
        raise UserError(f'{input_path} holds {what}, not a ViT: only ViT checkpoints convert to DeiT '
                        '(probe ResNets with main_lincls.py)')
    return {'model': state}


def main(args):
    try:
        converted = convert(args.input)
        save_checkpoint(converted, args.output)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    n = sum(v.numel() for v in converted['model'].values())
    print(f"=> wrote {args.output}: {len(converted['model'])} tensors, {n:,} values (no head)")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
