"""Compile dcls-mm's optional C++ kernels (run by tools/env/setup.sh).

    python tools/env/build_extension.py [--verbose]   # build if needed, print the path
    python tools/env/build_extension.py --status      # only say whether they are built

Exit status 0 when the kernels are built, 1 when they could not be (one line says why;
dcls_mm then uses its PyTorch fallback, which gives the same numbers, slower).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--verbose', action='store_true', help='show the compiler commands')
    parser.add_argument('--status', action='store_true', help='do not build, only report')
    args = parser.parse_args(argv)
    from dcls_mm.ops import extension
    path = extension.library_path()
    if args.status:
        built = path.is_file()
        print(f'[dcls-mm] compiled CPU kernels: {path if built else "not built (PyTorch fallback)"}',
              file=sys.stderr)
        return 0 if built else 1
    try:
        path = extension.build(verbose=args.verbose)
    except Exception as err:  # whatever the toolchain raises: the fallback still works
        lines = str(err).strip().splitlines()
        print(f'[dcls-mm] could not compile the optional C++ kernels ({type(err).__name__}: '
              f'{lines[-1] if lines else "no message"}); dcls_mm will use its PyTorch '
              'fallback. Compiler output: python tools/env/build_extension.py --verbose',
              file=sys.stderr)
        return 1
    print(f'[dcls-mm] compiled CPU kernels: {path}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
