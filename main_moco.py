#!/usr/bin/env python
"""MoCo v3 self-supervised pretraining (ResNet and ViT); also BYOL and Momentum² Teacher (--method).

Launch modes (-b is always the TOTAL batch over all processes; --lr is the base lr for batch 256):
  CPU or one GPU, no process group:   python main_moco.py -a resnet50 DIR            [--gpu 0]
  one process per GPU of this node:   python main_moco.py --multiprocessing-distributed --world-size 1 --rank 0 DIR
  several nodes (run on each, R=0..N-1):
      python main_moco.py --multiprocessing-distributed --world-size N --rank R --dist-url tcp://HOST:PORT DIR
  torchrun:                           torchrun --nproc_per_node=8 main_moco.py DIR
Without a GPU the same commands run on CPU processes with the gloo backend.
DIR holds train/<class>/<image> or train/<image> (no labels needed; val/<class>/<image> for the optional
kNN monitor). See CONFIG.md for recipes, README "Runs you can follow" for what a run writes.
"""
from moco.pretrain import get_args_parser, main

if __name__ == '__main__':
    main(get_args_parser().parse_args())
