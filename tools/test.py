"""Evaluate a checkpoint of an mmdet or mmseg model built from a dcls-mm config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--tta] [--out OUT] [--verbose]
                         [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

``CHECKPOINT`` may be a dcls-mm/mmengine training checkpoint (read with the checked
loader of :func:`dcls_mm.engine.register_checkpoint_loader`: weights-only unpickling with
mmengine/numpy state allowed) or a published downstream ``{'state_dict': ...}`` file.
``--tta`` uses the config's ``tta_pipeline``/``tta_model``: ADE20K configs resize to ratios
0.5, 0.75, ..., 1.75 of (2048, 512), keep ratio, each with and without flip (the
"multi-scale" column of the recipes); COCO configs use mmdet's three scales with flip,
merged by ``dcls_mm.DetMaskTTAModel``; the demo configs views at their own size (see each
config README). ``--out`` follows the downstream package's own
tools/test.py, chosen by the config's ``default_scope``.

A missing checkpoint or test data folder is reported before anything is built, one line
each (exit code 2). The console shows the metrics and where the log file is; the log
file in the work dir has mmengine's full log (``--verbose``: on the console too).
"""
from __future__ import annotations

import argparse

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

from mmengine.config import Config  # noqa: E402

from dcls_mm.engine.runner_utils import (  # noqa: E402
    add_common_args, add_verbose_arg, apply_common_args, build_runner, console_prints,
    parse_tool_args, run_cli, set_prediction_output, setup_dcls_mm, use_tta)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test a dcls-mm detector/segmentor')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    add_common_args(parser)
    add_verbose_arg(parser)
    parser.add_argument('--tta', action='store_true', help="test-time augmentation (the "
                        "config's tta_pipeline and tta_model: multi-scale + horizontal flip "
                        'views; each config README lists its views)')
    parser.add_argument('--out', help='save the predictions: mmdet configs: a .pkl file '
                        "(mmdet's DumpDetResults); mmseg configs: a directory of "
                        "prediction PNGs (the test evaluator's output_dir)")
    return parse_tool_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    apply_common_args(cfg, args)
    cfg.load_from = args.checkpoint
    if args.tta:
        use_tta(cfg)
    # the checkpoint is read over the model's initialisation: Pretrained files unused
    from dcls_mm.datasets.checks import check_inputs
    check_inputs(cfg, splits=('test',), pretrained=False)
    setup_dcls_mm(cfg)
    dump = set_prediction_output(cfg, args.out) if args.out is not None else None
    runner = build_runner(cfg, quiet=not args.verbose)
    with console_prints(runner, quiet=not args.verbose):
        if dump is not None:  # builds the evaluator: pycocotools prints while loading
            runner.test_evaluator.metrics.append(dump)
        return runner.test()


if __name__ == '__main__':
    run_cli(main)
