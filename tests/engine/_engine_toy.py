"""Tiny stand-ins: a ConvNeXt(-dcls)-named backbone and an mmdet-style model."""
import torch
from torch import nn

from dcls_mm.ops import Dcls2d


class Block(nn.Module):

    def __init__(self, dim, dks=5, count=3, P=None):
        super().__init__()
        self.dwconv = Dcls2d(dim, dim, count, padding=dks // 2, dilated_kernel_size=dks,
                             groups=dim, version='v0')
        if P is not None:
            self.dwconv.P = P  # shared positions (ConvNeXt-dcls share_positions)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 2 * dim)
        self.pwconv2 = nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(torch.nn.functional.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ToyConvNeXtDCLS(nn.Module):
    """Parameter names of mmdet/mmseg's ConvNeXt-dcls backbone, tiny widths."""

    def __init__(self, depths=(3, 3, 9, 3), dim=4, share_positions=True, dks=5, count=3):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dim, 4, 4), nn.GroupNorm(1, dim))])
        for _ in range(3):
            self.downsample_layers.append(
                nn.Sequential(nn.GroupNorm(1, dim), nn.Conv2d(dim, dim, 2, 2)))
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            blocks = [Block(dim, dks, count)]
            shared = blocks[0].dwconv.P if share_positions else None
            blocks += [Block(dim, dks, count, P=shared) for _ in range(depth - 1)]
            self.stages.append(nn.Sequential(*blocks))
            self.add_module(f'norm{i}', nn.GroupNorm(1, dim))

    def forward(self, x):
        outs = []
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            outs.append(getattr(self, f'norm{i}')(x))
        return tuple(outs)


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
    """The real ``dcls_mm.models.ConvNeXtDCLS`` (tiny widths) when it can be imported,
    else the stand-in :class:`ToyConvNeXtDCLS` with the same parameter names."""
    try:
        from dcls_mm.models import ConvNeXtDCLS
    except ImportError:
        return ToyConvNeXtDCLS(depths, dim, share_positions, dks, count)
    return ConvNeXtDCLS(arch=dict(depths=list(depths), dims=[dim] * 4), kernel_count=count,
                        dilated_kernel_size=dks, share_positions=share_positions)
