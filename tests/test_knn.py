"""moco/knn.py: the weighted kNN classifier, and the monitor's decoded sets (moco/data/eval_sets.py)
equal to the eval view's."""

import torch

from moco.data.memory import InMemoryLoader
from moco.knn import knn_classify


def test_knn_two_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    train = torch.cat([centers[0] + 0.3 * torch.randn(10, 3, generator=gen),
                       centers[1] + 0.3 * torch.randn(10, 3, generator=gen)])
    labels = torch.tensor([0] * 10 + [1] * 10)
    test = torch.cat([centers[0] + 0.3 * torch.randn(5, 3, generator=gen),
                      centers[1] + 0.3 * torch.randn(5, 3, generator=gen)])
    expected = torch.tensor([0] * 5 + [1] * 5)
    for k in (1, 5, 200):
        assert torch.equal(knn_classify(train, labels, test, num_classes=2, k=k), expected)
    # chunking does not change the answer
    assert torch.equal(knn_classify(train, labels, test, num_classes=2, k=5, chunk=3), expected)


def _unit(angle_deg):
    a = torch.tensor(angle_deg, dtype=torch.float32) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()])


def test_knn_weighting_by_exp_similarity_decides():
    # one class-1 neighbour at similarity 1.0, two class-0 neighbours at similarity cos(36.87 deg) = 0.8
    train = torch.stack([_unit(0.0), _unit(36.8699), _unit(-36.8699)])
    labels = torch.tensor([1, 0, 0])
    test = _unit(0.0)[None]
    # T = 0.1: e^10 > 2 e^8 -> class 1 wins despite being outnumbered
    assert knn_classify(train, labels, test, num_classes=2, k=3, T=0.1).tolist() == [1]
    # T = 1: e^1 < 2 e^0.8 -> the majority wins
    assert knn_classify(train, labels, test, num_classes=2, k=3, T=1.0).tolist() == [0]


def test_knn_k_limits_voters_and_features_need_not_be_normalised():
    # nearest: class 1 (sim 0.99); next two: class 0 (sim 0.98)
    train = torch.stack([_unit(8.1096), _unit(11.4783), _unit(-11.4783)])
    labels = torch.tensor([1, 0, 0])
    test = _unit(0.0)[None]
    assert knn_classify(train, labels, test, num_classes=2, k=1, T=1.0).tolist() == [1]
    assert knn_classify(train, labels, test, num_classes=2, k=3, T=1.0).tolist() == [0]
    scaled = train * torch.tensor([[100.0], [0.01], [3.0]])     # cosine similarity ignores the scale
    assert knn_classify(scaled, labels, test * 42, num_classes=2, k=1, T=1.0).tolist() == [1]
    assert knn_classify(scaled, labels, test * 42, num_classes=2, k=3, T=1.0).tolist() == [0]


def test_knn_monitor_reads_the_decoded_images_like_the_eval_transform(tiny_folder):
    """The memory pipeline's kNN monitor (no PIL at each evaluation) gives the reference path's
    features bit for bit when the images have the crop size (CIFAR at 32 px)."""
    from moco.data.eval_sets import DecodedImages, knn_sets
    from moco.data.folder import SafeImageFolder
    from moco.knn import extract_features
    from moco.models import BackboneFeatures, build_moco
    loader = InMemoryLoader(tiny_folder, 'train', 8, torch.device('cpu'), 32, seed=0)
    in_memory = knn_sets(loader, tiny_folder, 32)
    reference = knn_sets(None, tiny_folder, 32)
    assert all(isinstance(s, DecodedImages) for s in in_memory)
    assert all(isinstance(s, SafeImageFolder) for s in reference)
    torch.manual_seed(0)
    backbone = BackboneFeatures(build_moco('resnet18_cifar', 16, 32).base_encoder).eval()
    for ours, ref in zip(in_memory, reference):
        f_ours, y_ours = extract_features(backbone, ours, torch.device('cpu'), batch_size=16)
        f_ref, y_ref = extract_features(backbone, ref, torch.device('cpu'), batch_size=16)
        assert torch.equal(y_ours, y_ref) and torch.equal(f_ours, f_ref)
    # a smaller training size: the decoded images resized whole, as the eval transform resizes them
    # with PIL (equal up to the rounding of the two resizes)
    for ours, ref in zip(knn_sets(loader, tiny_folder, 24), knn_sets(None, tiny_folder, 24)):
        assert isinstance(ours, DecodedImages) and ours.images.shape[2:] == (24, 24)
        x_ours = torch.cat([x for x, _ in ours.batches(list(range(len(ours))), 64)])
        x_ref = torch.stack([ref[i][0] for i in range(len(ref))])
        assert (x_ours - x_ref).abs().max() <= 2 / 255 / 0.224   # two grey levels, in normalised units
    # a large size is centre-cropped by the eval transform: the reference path
    assert all(isinstance(s, SafeImageFolder) for s in knn_sets(loader, tiny_folder, 96))
