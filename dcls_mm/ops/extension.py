"""Optional compiled CPU kernels of :mod:`dcls_mm.ops`, with a pure-PyTorch fallback.

The C++ sources in ``dcls_mm/ops/csrc`` are compiled once by ``bash tools/env/setup.sh``
(which runs ``tools/env/build_extension.py``) into a cache folder keyed by
the sources, the compiler flags, torch and Python; importing :mod:`dcls_mm` never
compiles anything and never fails because of them. When the library for the running
sources is missing or does not load (no compiler when setup ran, other torch, edited
sources) the callers use their PyTorch fallback and one log line says why.

The cache folder is ``$DCLS_MM_EXT_DIR`` if set, else ``~/.cache/dcls-mm/ext``
(``$XDG_CACHE_HOME`` is honoured).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger('dcls_mm')

NAME = 'dcls_mm_cpu'
_CSRC = Path(__file__).parent / 'csrc'
SOURCES = (_CSRC / 'depthwise_kernel_grad.cpp', _CSRC / 'depthwise_conv.cpp',
           _CSRC / 'separable_kernel.cpp', _CSRC / 'bilinear_kernel.cpp',
           _CSRC / 'sparse_depthwise_conv.cpp', _CSRC / 'gradient_support.cpp')
#: included by the sources: part of the build key too
HEADERS = (_CSRC / 'isa.h', )
# -fopenmp: at::parallel_for is inlined from torch's headers, so the OpenMP pragmas it
# relies on must be compiled here; without the flag the kernels would run on one thread.
# -fno-trapping-math: GCC may then turn a float compare-and-select (the gaussian's
# exponential, the triangle's max) into vector blends; by default it only does so with
# AVX-512 masks, so the AVX2 copy of the gaussian profile loop stayed scalar (7x slower).
# It changes no value (the code reads no floating-point exception flags).
CFLAGS = ('-O3', '-fopenmp', '-fno-trapping-math')
LDFLAGS = ('-fopenmp', )

_state = {'loaded': None, 'isa': None}  # loaded: None = not tried yet, then True/False


def build_dir() -> Path:
    """Folder of the library matching the running sources, flags, torch and Python."""
    root = os.environ.get('DCLS_MM_EXT_DIR')
    if not root:
        cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(Path.home(), '.cache')
        root = os.path.join(cache, 'dcls-mm', 'ext')
    digest = hashlib.sha256()
    for src in SOURCES + HEADERS:
        digest.update(src.read_bytes())
    digest.update(' '.join(CFLAGS + LDFLAGS).encode())
    tag = (f'torch{torch.__version__.split("+")[0]}-py{sys.version_info[0]}{sys.version_info[1]}'
           f'-{digest.hexdigest()[:12]}')
    return Path(root) / tag


def library_path() -> Path:
    return build_dir() / f'{NAME}.so'


def build(verbose: bool = False) -> Path:
    """Compile the library (no-op when it is already built); returns its path.

    Raises whatever :func:`torch.utils.cpp_extension.load` raises when the toolchain
    is missing or the compilation fails.
    """
    path = library_path()
    if path.is_file():
        return path
    # torch logs warnings that do not concern a CPU-only build (no CUDA runtime, its
    # compiler-name check); keep them for --verbose
    torch_logger = logging.getLogger('torch.utils.cpp_extension')
    level = torch_logger.level
    if not verbose:
        torch_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension  # slow import, needed only here
        path.parent.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES],
                           extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                           build_directory=str(path.parent), is_python_module=False,
                           verbose=verbose)
    finally:
        torch_logger.setLevel(level)
    if not path.is_file():
        raise RuntimeError(f'the build finished but {path} was not written')
    return path


def available() -> bool:
    """Whether the compiled ops are loaded (``torch.ops.dcls_mm.*``); loads them on the
    first call and logs once, at INFO level, why not when they cannot be."""
    if _state['loaded'] is None:
        _state['loaded'] = _load()
    return _state['loaded']


def _load() -> bool:
    path = library_path()
    if not path.is_file():
        logger.info('dcls_mm: compiled CPU kernels not built for these sources and torch '
                    '(%s is missing); using the PyTorch fallback. Build them with: '
                    'bash tools/env/setup.sh', path)
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as err:
        logger.info('dcls_mm: could not load the compiled CPU kernels %s (%s); using the '
                    'PyTorch fallback. Rebuild them with: bash tools/env/setup.sh', path,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
        return False
    torch.library.register_fake('dcls_mm::depthwise_kernel_grad')(_depthwise_kernel_grad_fake)
    torch.library.register_fake('dcls_mm::separable_kernel')(_separable_kernel_fake)
    torch.library.register_fake('dcls_mm::separable_kernel_backward')(
        _separable_kernel_backward_fake)
    torch.library.register_fake('dcls_mm::depthwise_conv')(_depthwise_conv_fake)
    torch.library.register_fake('dcls_mm::sparse_depthwise_conv')(_depthwise_conv_fake)
    torch.library.register_fake('dcls_mm::sparse_depthwise_kernel_grad')(
        _sparse_depthwise_kernel_grad_fake)
    torch.library.register_fake('dcls_mm::gradient_support')(_gradient_support_fake)
    torch.library.register_fake('dcls_mm::bilinear_kernel')(_bilinear_kernel_fake)
    torch.library.register_fake('dcls_mm::bilinear_kernel_backward')(
        _bilinear_kernel_backward_fake)
    # the hot loops' copy (AVX-512 / AVX2 / baseline) follows ATen's CPU capability, so
    # ATEN_CPU_CAPABILITY=avx2 emulates an AVX2 machine for these kernels too
    _state['isa'] = torch.ops.dcls_mm.set_cpu_isa(torch.backends.cpu.get_cpu_capability())
    return True


def isa() -> str:
    """Which copy of the compiled hot loops runs (``'x86-64-v4'``, ``'x86-64-v3'``,
    ``'baseline'``), or ``'not built'`` when the PyTorch fallback is used."""
    return _state['isa'] if available() else 'not built'


def _depthwise_kernel_grad_fake(x, grad_out, kh, kw, pad_top, pad_left, stride_h, stride_w):
    # what torch.compile / export see instead of running the kernel
    return x.new_empty(kh, kw, x.shape[1]).permute(2, 0, 1).unsqueeze(1)


def _separable_kernel_fake(weight, P, SIG, L0, L1, interp, r0, nr, c0, nc, keep_profiles=False):
    blocks = -(-weight.shape[0] // 16) if keep_profiles else 0  # kBlock in the C++ source
    K = weight.shape[1]
    return (weight.new_empty(weight.shape[0], nr, nc),
            weight.new_empty(blocks, (K * (L0 + L1) + 2 * K) * 16))


def _separable_kernel_backward_fake(grad, weight, P, SIG, kept, L0, L1, interp, r0, nr, c0,
                                    nc, out):
    return weight.new_empty(weight.shape), P.new_empty(P.shape), SIG.new_empty(SIG.shape)


def _bilinear_kernel_fake(weight, P, L0, L1, r0, nr, c0, nc):
    return weight.new_empty(weight.shape[0], nr, nc)


def _bilinear_kernel_backward_fake(grad, weight, P, L0, L1, r0, nr, c0, nc):
    return weight.new_empty(weight.shape), P.new_empty(P.shape)


def _depthwise_conv_fake(x, kernel, bias, pad_top, pad_bottom, pad_left, pad_right):
    n, c, h, w = x.shape
    return x.new_empty(n, c, h + pad_top + pad_bottom - kernel.shape[2] + 1,
                       w + pad_left + pad_right - kernel.shape[3] + 1).contiguous(
                           memory_format=torch.channels_last)


def _sparse_depthwise_kernel_grad_fake(x, grad_out, support, pad_top, pad_bottom, pad_left,
                                       pad_right):
    return x.new_empty(support.shape)


def _gradient_support_fake(P, SIG, offset, L0, L1, r0, nr, c0, nc):
    return P.new_empty(P.shape[1], nr, nc, dtype=torch.bool)
