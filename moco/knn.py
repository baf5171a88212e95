"""Weighted k-nearest-neighbour accuracy of frozen features (Wu et al. 2018, InstDisc; as in lightly
and DINO): cosine similarity, the k most similar training images vote for their class with weight
exp(similarity / T). The monitor's two sets are moco/data/eval_sets.py's.
"""
import torch
import torch.nn.functional as F

from moco import dist
from moco.data.eval_sets import DecodedImages
from moco.data.sampler import ignore_stop_signals


def knn_classify(train_features, train_labels, test_features, num_classes, k=200, T=0.1, chunk=1024):
    """Predicted class of every test feature. Features need not be normalised."""
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    k = min(k, train_features.shape[0])
    preds = []
    for start in range(0, test_features.shape[0], chunk):
        sim = test_features[start:start + chunk] @ train_features.t()            # (b, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)                                     # (b, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / T).exp())         # (b, C)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(train_features, train_labels, test_features, test_labels, k=200, T=0.1):
    """Top-1 (percent) of ``knn_classify`` on labelled test features."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_classify(train_features, train_labels, test_features, num_classes, k=k, T=T)
    return (pred == test_labels).float().mean().item() * 100


@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size=256, workers=0, amp=None):
    """Features and labels of a whole dataset, in dataset order, computed by all processes together
    (each takes every world_size-th image) and gathered on every process."""
    ws, rk = dist.world_size(), dist.rank()
    n = len(dataset)
    per_rank = (n + ws - 1) // ws
    indices = list(range(rk, n, ws))
    indices += indices[:1] * (per_rank - len(indices))   # pad so every rank gathers the same size
    if isinstance(dataset, DecodedImages):  # already decoded on the device
        loader = dataset.batches(indices, batch_size)
    else:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                             num_workers=workers, shuffle=False,
                                             worker_init_fn=ignore_stop_signals)
    feats, labels = [], []
    for images, target in loader:
        with (amp.autocast() if amp is not None else torch.autocast('cpu', enabled=False)):
            f = backbone(images.to(device, non_blocking=True))
        feats.append(f.float())
        labels.append(target.to(device))
    feats, labels = torch.cat(feats), torch.cat(labels)                            # (per_rank, D)
    if ws > 1:  # interleave back to dataset order: global index = i * ws + rank
        feats = dist.concat_all_gather(feats).view(ws, per_rank, -1).transpose(0, 1).reshape(ws * per_rank, -1)
        labels = dist.concat_all_gather(labels).view(ws, per_rank).t().reshape(-1)
    return feats[:n], labels[:n]


def knn_accuracy(backbone, train_set, test_set, device, k=200, T=0.1, batch_size=256, workers=0, amp=None):
    """Top-1 (percent) of the weighted kNN classifier on ``test_set`` with ``train_set`` as memory."""
    was_training = backbone.training
    backbone.eval()
    try:
        train_f, train_y = extract_features(backbone, train_set, device, batch_size, workers, amp)
        test_f, test_y = extract_features(backbone, test_set, device, batch_size, workers, amp)
    finally:
        backbone.train(was_training)
    return knn_top1(train_f, train_y, test_f, test_y, k=k, T=T)


def feature_monitors(backbone, train_set, test_set, device, rankme_images=None, k=200, T=0.1, batch_size=256,
                     workers=0, amp=None):
    """The feature monitors of a pretraining run, on eval-mode backbone features: {'knn_top1' (with a
    labelled ``test_set``), 'rankme', 'feature_std'} (moco/monitors.py) of ``train_set``'s images
    ``rankme_images`` (default: all); ``test_set`` None: only those images are read."""
    from moco.monitors import feature_std, rankme
    was_training = backbone.training
    backbone.eval()
    try:
        if test_set is None:
            train_f, _ = extract_features(backbone, _subset(train_set, rankme_images), device, batch_size, workers, amp)
            out = {}
        else:
            train_f, train_y = extract_features(backbone, train_set, device, batch_size, workers, amp)
            test_f, test_y = extract_features(backbone, test_set, device, batch_size, workers, amp)
            out = {'knn_top1': knn_top1(train_f, train_y, test_f, test_y, k=k, T=T)}
            if rankme_images is not None:
                train_f = train_f[torch.tensor(rankme_images, device=train_f.device)]
    finally:
        backbone.train(was_training)
    return dict(out, rankme=rankme(train_f), feature_std=feature_std(train_f))


def _subset(dataset, indices):
    if indices is None:
        return dataset
    if isinstance(dataset, DecodedImages):
        index = torch.tensor(indices, device=dataset.images.device)
        return DecodedImages(dataset.images[index], dataset.targets[index])
    return torch.utils.data.Subset(dataset, indices)


def raw_pixel_knn_accuracy(train_images, train_labels, test_images, test_labels, k=200, T=0.1):
    """Top-1 (percent) of the same weighted kNN on raw pixels: each image flattened to a vector, minus
    the mean training image (``*_images``: (N, C, H, W), any dtype; all of one size). The baseline a
    learned representation has to beat."""
    train = train_images.flatten(1).float()
    mean = train.mean(dim=0, keepdim=True)
    test = test_images.flatten(1).float()
    return knn_top1(train - mean, train_labels, test - mean, test_labels, k=k, T=T)
