"""The MoCo v3 model (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision
Transformers", ICCV 2021), as in the paper's Algorithm 1:

    f_q: backbone + projection head + prediction head      f_k: backbone + projection head (EMA of f_q)
    for x in loader:
        x1, x2 = aug(x), aug(x)
        q1, q2 = f_q(x1), f_q(x2)
        k1, k2 = f_k(x1), f_k(x2)
        loss = ctr(q1, k2) + ctr(q2, k1)     # symmetrized
        loss.backward(); update(f_q)
        f_k = m * f_k + (1 - m) * f_q        # momentum update

In this implementation the momentum update happens inside ``forward``, before the keys are computed,
exactly as in the authors' PyTorch release. Each view goes through each encoder in its own call, so
BatchNorm statistics are per view. Checkpoint keys: ``base_encoder.*``, ``momentum_encoder.*``,
``predictor.*``.

BYOL and Momentum² Teacher are the same loop with a different loss and heads (see the end of this
file): BYOL is MoCo v3 without negatives; Momentum² Teacher also normalises the teacher with momentum
BatchNorm statistics instead of synchronised BatchNorm.

Each method class declares what the scripts need to know about it (``sync_bn``, ``eval_encoder``,
``zero_init_residual``, ``before_step``), so no script, engine or checkpoint asks for the method's name.

References: facebookresearch/moco-v3 moco/builder.py (CC-BY-NC 4.0; re-written).
"""
import math

import torch
import torch.nn as nn

from moco.losses import infonce, regression_loss
from moco.momentum_bn import convert_to_momentum_bn, mbn_alpha, set_alpha


class MoCo(nn.Module):
    """Base class: builds the two encoders and leaves the heads to ``_build_projector_and_predictor_mlps``.

    base_encoder: a callable taking ``num_classes`` (e.g. ``torchvision.models.resnet50``);
    dim: output dim of the projector/predictor (default 256); mlp_dim: hidden dim (default 4096);
    T: softmax temperature (default 1.0).
    """
    mlp_bias = (False, False)   # bias of the (hidden, last) Linear layers of both MLP heads
    last_bn = True              # the BN after the last Linear (projector always, predictor of ViTs)
    sync_bn = True              # every BatchNorm is synchronised across processes
    eval_encoder = 'base_encoder'  # what linear probing, the kNN monitor and conversion read
    zero_init_residual = True   # ResNets start with the last BN of each residual block at zero

    @staticmethod
    def defaults(epochs, total_batch):
        """The flags a run leaves unset (moco/methods.py): the original main_moco.py's defaults."""
        return dict(lr=0.6, weight_decay=1e-6, moco_m=0.99, optimizer='lars', moco_m_cos=None)

    def __init__(self, base_encoder, dim=256, mlp_dim=4096, T=1.0):
        super().__init__()
        self.T = T

        # the classifier of each encoder is built with mlp_dim outputs, then replaced by the projector
        self.base_encoder = base_encoder(num_classes=mlp_dim)
        self.momentum_encoder = base_encoder(num_classes=mlp_dim)
        self._build_projector_and_predictor_mlps(dim, mlp_dim)

        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)  # start as an exact copy
            param_m.requires_grad = False     # updated by the moving average, never by gradient
        # the moving average pairs parameters by position: make sure they are the same tensors by name
        names_b = [(n, p.shape) for n, p in self.base_encoder.named_parameters()]
        assert names_b == [(n, p.shape) for n, p in self.momentum_encoder.named_parameters()]

    def _build_mlp(self, num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
        """Linear layers (MoCo v3: without bias); BN + ReLU between them; after the last one a BN
        without affine parameters when ``last_bn`` ("follow SimCLR's design ... we further removed gamma
        in BN") and the method has one."""
        bias_hidden, bias_last = self.mlp_bias
        mlp = []
        for layer in range(num_layers):
            dim1 = input_dim if layer == 0 else mlp_dim
            dim2 = output_dim if layer == num_layers - 1 else mlp_dim
            if layer < num_layers - 1:
                mlp.append(nn.Linear(dim1, dim2, bias=bias_hidden))
                mlp.append(nn.BatchNorm1d(dim2))
                mlp.append(nn.ReLU(inplace=True))
            else:
                mlp.append(nn.Linear(dim1, dim2, bias=bias_last))
                if last_bn and self.last_bn:
                    mlp.append(nn.BatchNorm1d(dim2, affine=False))
        return nn.Sequential(*mlp)

    def _build_projector_and_predictor_mlps(self, dim, mlp_dim):
        raise NotImplementedError('use MoCo_ResNet or MoCo_ViT')

    def before_step(self, progress):
        """Called by the training loop before each step; ``progress``: the fraction of training done."""

    @torch.no_grad()
    def _update_momentum_encoder(self, m):
        """xi <- m * xi + (1 - m) * theta over parameters only (BN running statistics are not averaged).

        Evaluated as two separately rounded products and a sum, bit-identical to the original's
        ``param_m.data * m + param_b.data * (1. - m)``, but without a Python loop over tensors.
        """
        params_b = list(self.base_encoder.parameters())
        params_m = list(self.momentum_encoder.parameters())
        torch._foreach_mul_(params_m, m)
        torch._foreach_add_(params_m, torch._foreach_mul(params_b, 1. - m))

    def contrastive_loss(self, q, k):
        return infonce(q, k, self.T)

    def collapsed_loss(self, global_batch):
        """The loss when every query is as similar to every key (collapsed features): 2 x ctr = 2 x 2T ln(B)."""
        return 4 * self.T * math.log(global_batch)

    def pair_loss(self, q, k):
        """The loss of queries of one view against keys of the other."""
        return self.contrastive_loss(q, k)

    def forward(self, x1, x2, m):
        """x1, x2: two augmented views, (N, 3, H, W) each; m: momentum coefficient. Returns the loss."""
        q1 = self.predictor(self.base_encoder(x1))   # (N, dim) queries
        q2 = self.predictor(self.base_encoder(x2))

        with torch.no_grad():
            self._update_momentum_encoder(m)          # before computing the keys
            k1 = self.momentum_encoder(x1)            # (N, dim) keys
            k2 = self.momentum_encoder(x2)

        return self.pair_loss(q1, k2) + self.pair_loss(q2, k1)

    def forward_from_features(self, h1, h2, m, momentum_features):
        """``forward`` from the online backbone's features of the two views (``h1``, ``h2``: what its head
        takes, a ViT's pooled [cls] token), for a step that runs the backbones by pieces of the batch
        (--micro-batch, moco/microbatch.py): the same heads on the whole batch (their BatchNorms see all of
        it), in ``forward``'s order: the queries, the momentum update, then the keys, whose backbone
        features ``momentum_features(i)`` gives for view ``i`` (0, 1), called after the update. Keep it in
        step with ``forward``: tests/test_microbatch.py checks that both give the same loss and gradients."""
        q1 = self.predictor(getattr(self.base_encoder, self.head_attr)(h1))
        q2 = self.predictor(getattr(self.base_encoder, self.head_attr)(h2))

        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = getattr(self.momentum_encoder, self.head_attr)(momentum_features(0))
            k2 = getattr(self.momentum_encoder, self.head_attr)(momentum_features(1))

        return self.pair_loss(q1, k2) + self.pair_loss(q2, k1)


class MoCo_ResNet(MoCo):
    """ResNet: 2-layer projector (on the pooled 2048-d feature for R50), 2-layer predictor without
    the last BN."""
    head_attr = 'fc'   # the encoder's classifier, then projector

    def _build_projector_and_predictor_mlps(self, dim, mlp_dim):
        hidden_dim = self.base_encoder.fc.weight.shape[1]
        del self.base_encoder.fc, self.momentum_encoder.fc  # remove the classifier

        self.base_encoder.fc = self._build_mlp(2, hidden_dim, mlp_dim, dim)
        self.momentum_encoder.fc = self._build_mlp(2, hidden_dim, mlp_dim, dim)
        self.predictor = self._build_mlp(2, dim, mlp_dim, dim, last_bn=False)


class MoCo_ViT(MoCo):
    """ViT: 3-layer projector on the [cls] feature, 2-layer predictor, both ending in BN."""
    head_attr = 'head'

    def _build_projector_and_predictor_mlps(self, dim, mlp_dim):
        hidden_dim = self.base_encoder.head.weight.shape[1]
        del self.base_encoder.head, self.momentum_encoder.head  # remove the classifier

        self.base_encoder.head = self._build_mlp(3, hidden_dim, mlp_dim, dim)
        self.momentum_encoder.head = self._build_mlp(3, hidden_dim, mlp_dim, dim)
        self.predictor = self._build_mlp(2, dim, mlp_dim, dim)


# ---- BYOL and Momentum² Teacher: the same loop, other loss and heads ----

class BYOL:
    """BYOL (Grill et al. 2020), as in the official DeepMind code: MoCo v3's encoders, moving average
    (parameters only, before the target pass), views and optimizer, but no negatives:

        loss = mean_i [(2 - 2 cos(p1_i, z'2_i)) + (2 - 2 cos(p2_i, z'1_i))]     (about 4 at init)

    Heads: Linear(bias) -> BN -> ReLU -> Linear(no bias), no BN at the end. BatchNorm is synchronised
    and each view is forwarded on its own, as in MoCo v3 and the official BYOL. Residual branches keep
    torchvision's initialisation.
    """
    mlp_bias = (True, False)
    last_bn = False
    zero_init_residual = False
    # the official presets (configs/byol.py, batch 4096), chosen by the number of epochs:
    # epochs up to -> (base lr per 256, weight decay, base momentum of the target)
    PRESETS = ((40, 0.45, 1e-6, 0.97), (100, 0.45, 1e-6, 0.99), (300, 0.3, 1e-6, 0.99),
               (float('inf'), 0.2, 1.5e-6, 0.996))

    @classmethod
    def defaults(cls, epochs, total_batch):
        _, lr, wd, m = next(p for p in cls.PRESETS if epochs <= p[0])
        return dict(lr=lr, weight_decay=wd, moco_m=m, optimizer='lars', moco_m_cos=True)

    def pair_loss(self, p, z):
        return regression_loss(p, z)

    def collapsed_loss(self, global_batch):
        return None   # collapsed features give loss 0, which a healthy run approaches too: RankMe tells


class MomentumSquaredTeacher(BYOL):
    """Momentum² Teacher (Li et al. 2021): BYOL (its loss, no BN after the last Linear) with per-process
    BatchNorm in the student and momentum BatchNorm (``moco/momentum_bn.py``) in the teacher, so no
    BatchNorm is synchronised. Every Linear has a bias. The teacher is what is evaluated.

    The momentum-BN coefficient alpha of each step comes from the global step (``before_step``, with
    ``moco.momentum_bn.mbn_alpha``), or is given to ``forward(x1, x2, m, alpha)``. The teacher's two
    passes update each momentum BN once.
    """
    mlp_bias = (True, True)
    sync_bn = False
    eval_encoder = 'momentum_encoder'

    @staticmethod
    def defaults(epochs, total_batch):
        """The release's: SGD (weight decay on every parameter) up to batch 1024, LARS above."""
        if total_batch <= 1024:
            return dict(lr=0.05, weight_decay=1e-4, moco_m=0.99, optimizer='sgd', moco_m_cos=True)
        return dict(lr=0.45 if epochs <= 200 else 0.3, weight_decay=1e-6, moco_m=0.99, optimizer='lars',
                    moco_m_cos=True)

    def __init__(self, *args, mbn_faithful=True, **kwargs):
        super().__init__(*args, **kwargs)
        convert_to_momentum_bn(self.momentum_encoder, faithful=mbn_faithful)

    def before_step(self, progress):
        set_alpha(self.momentum_encoder, mbn_alpha(progress))

    def forward(self, x1, x2, m, alpha=None):
        if alpha is not None:
            set_alpha(self.momentum_encoder, alpha)
        return super().forward(x1, x2, m)


class BYOL_ResNet(BYOL, MoCo_ResNet):
    pass


class BYOL_ViT(BYOL, MoCo_ViT):
    pass


class M2T_ResNet(MomentumSquaredTeacher, MoCo_ResNet):
    pass


class M2T_ViT(MomentumSquaredTeacher, MoCo_ViT):
    pass


METHODS = {  # --method -> (ResNet class, ViT class); each class declares its defaults and needs
    'mocov3': (MoCo_ResNet, MoCo_ViT),
    'byol': (BYOL_ResNet, BYOL_ViT),
    'm2t': (M2T_ResNet, M2T_ViT),
}
