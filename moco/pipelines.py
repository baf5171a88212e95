"""The three input pipelines of pretraining behind one call (``--data-pipeline``).

reference: PIL/torchvision ops in loader workers, the original's pixels (moco/data.py).
memory:    the whole folder decoded once into (GPU) memory, views made batch-wise on the device;
           small images of one size such as CIFAR (moco/memory_data.py).
gpu:       workers read JPEG bytes, the batch is decoded and both views made on the GPU; full-size
           folders such as ImageNet (moco/gpu_data.py).
auto:      gpu when CUDA is present, else reference.
"""
from moco.data import image_folder, make_loader, pretrain_transform

PIPELINES = ('auto', 'reference', 'memory', 'gpu')


def resolve(pipeline, device):
    if pipeline == 'auto':
        return 'gpu' if device.type == 'cuda' else 'reference'
    return pipeline


def pretrain_loader(pipeline, root, batch_size, device, image_size, crop_min=0.08, blur=True, seed=None,
                    workers=0, strict=False):
    """(loader of ``([view1, view2], targets, skipped)`` batches of root/train, number of images)."""
    pipeline = resolve(pipeline, device)
    if pipeline == 'memory':
        from moco.memory_data import InMemoryLoader
        loader = InMemoryLoader(root, 'train', batch_size, device, image_size, crop_min, blur=blur, seed=seed,
                                workers=workers, strict=strict)
        return loader, len(loader.images)
    if pipeline == 'gpu':
        from moco.gpu_data import GpuJpegLoader
        loader = GpuJpegLoader(root, 'train', batch_size, device, image_size, crop_min, blur=blur, seed=seed,
                               workers=workers, strict=strict)
        return loader, len(loader.folder)
    train_set = image_folder(root, 'train', pretrain_transform(image_size, crop_min, blur=blur), strict=strict)
    loader = make_loader(train_set, batch_size, workers, shuffle=True, drop_last=True, seed=seed,
                         pin_memory=device.type == 'cuda')
    return loader, len(train_set)
