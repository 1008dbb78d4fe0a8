"""Tiny models for the engine tests: a tiny-width ConvNeXtDCLS and an mmdet-style model."""
from torch import nn

from dcls_mm.models import ConvNeXtDCLS


class ToyDetector(nn.Module):
    """mmdet-style model: ``backbone``, ``neck``, ``head`` and a ``loss`` method."""

    def __init__(self, backbone, dim=4):
        super().__init__()
        self.backbone = backbone
        self.neck = nn.Conv2d(dim, dim, 1)
        self.head = nn.Linear(dim, 2)

    def forward(self, inputs, data_samples=None, mode='loss'):
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        return self.head(self.neck(self.backbone(inputs)[-1]).mean((2, 3)))

    def loss(self, inputs, data_samples=None):
        out = self.forward(inputs, mode='tensor')
        return dict(loss_cls=out.pow(2).mean())


def make_backbone(depths=(3, 3, 9, 3), share_positions=True, dks=5, count=3, dim=4):
    """``dcls_mm.models.ConvNeXtDCLS`` with the given depths and tiny widths."""
    return ConvNeXtDCLS(arch=dict(depths=list(depths), dims=[dim] * 4), kernel_count=count,
                        dilated_kernel_size=dks, share_positions=share_positions)
