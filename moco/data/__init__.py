"""The input of every script, as one package, in the order a batch is made:

folder.py         image folders (class folders or images alone), any image mode as RGB, and the one
                  rule for an unreadable file: reported once, replaced by the next readable one
views.py          MoCo v3's two augmented views: the original's op list (the definition) and its bit-identical
                  PIL views (the reference pipeline), and the eval views
pil_ops.py        PIL's colour jitter, Gaussian blur and solarize computed faster, the same bytes (views.py)
sampler.py        the order of an epoch and each image's view seed, from (seed, epoch, position);
                  the reference loader (``make_loader``) and ``start_epoch``
tensor_views.py   the same two views computed batch-wise on tensors (CPU or GPU): the views (and the
                  one crop-and-resize) of both device pipelines, for a batch of one size or a list
device_loader.py  what the device pipelines share: the sampler, ``num_images``, batches made ahead
memory.py         --data-pipeline memory: a folder of small images decoded once into (GPU) memory
gpu.py            --data-pipeline gpu: JPEGs decoded (nvJPEG) on the GPU, views by tensor_views
pipelines.py      --data-pipeline: which of the three a run uses (``resolve``, once) and its loader

The names the scripts use are importable from ``moco.data`` itself.
"""
from moco.data.folder import image_folder, is_unlabelled, is_unlabelled_folder
from moco.data.sampler import make_loader, start_epoch
from moco.data.views import eval_transform, lincls_train_transform, original_pretrain_transform, pil_pretrain_transform

__all__ = ['image_folder', 'is_unlabelled', 'is_unlabelled_folder', 'make_loader', 'start_epoch', 'eval_transform',
           'lincls_train_transform', 'original_pretrain_transform', 'pil_pretrain_transform']
