"""The classifier robustness runner against a plain per-image loop; resume, fingerprint,
checkpoints, unreadable images, and the CLI's one-line errors."""
import csv
import json
import os
import os.path as osp
import shutil

import pytest
import torch

from dcls_mm.evaluation import classification
from dcls_mm.evaluation.classification import (BadImageError, CheckpointError, EvalConfig,
                                               build_classifier, run_evaluation)
from dcls_mm.evaluation.folders import DataLayoutError
from dcls_mm.evaluation.records import FingerprintMismatch
from tests._helpers import load_tool

from ._robustness_data import (C_BAR, C_SETS, CATEGORIES, MODEL, Reference, build_data_root,
                               reference_files, save_model_checkpoint)

# tiny models: one torch thread, module-scoped fixtures included (tests/conftest.py)
pytestmark = pytest.mark.usefixtures('one_thread_module')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp('robustness')
    ckpt = save_model_checkpoint(str(base / 'model.pth'))
    root = build_data_root(str(base / 'data'), ckpt)
    return {'base': base, 'root': root, 'ckpt': ckpt}


def _cfg(ctx, out, **kw):
    args = dict(model=MODEL, benchmarks=['all'], out_dir=str(out), data_root=ctx['root'],
                checkpoint=ctx['ckpt'], batch_size=4, workers=1, progress=False)
    args.update(kw)
    return EvalConfig(**args)


@pytest.fixture(scope='module')
def full_run(data):
    out = data['base'] / 'full'
    return run_evaluation(_cfg(data, out)), out


def _pct(hits, n):
    return 100.0 * hits / n


def test_numbers_equal_plain_loop(data, full_run):
    out, out_dir = full_run
    res = out['results']['benchmarks']
    root = data['root']
    ref = Reference(data['ckpt'])

    def check_half_right(top1, n):  # the data put every other image in its predicted class
        assert top1 == (n + 1) // 2
    for bench, folder, subset in (('imagenet', 'imagenet/val', None),
                                  ('imagenet-a', 'imagenet-a', 'a'),
                                  ('imagenet-r', 'imagenet-r', 'r'),
                                  ('imagenet-sketch', 'sketch', None)):
        files, indices = reference_files(osp.join(root, folder), subset)
        top1, top5, n = ref.counts(files, native=False, class_indices=indices)
        check_half_right(top1, n)
        assert res[bench]['num_images'] == n
        assert res[bench]['top1'] == pytest.approx(_pct(top1, n), abs=1e-9), bench
        assert res[bench]['top5'] == pytest.approx(_pct(top5, n), abs=1e-9), bench
    for corruption, severities in C_SETS.items():
        for sev in severities:
            files, _ = reference_files(osp.join(root, 'imagenet-c', CATEGORIES[corruption],
                                                corruption, str(sev)))
            top1, _, n = ref.counts(files, native=True)
            check_half_right(top1, n)
            assert res['imagenet-c']['errors'][corruption][str(sev)] == pytest.approx(
                100 - _pct(top1, n), abs=1e-9)
    for corruption, named in C_BAR.items():
        for name, sev in named:
            files, _ = reference_files(osp.join(root, 'imagenet-c-bar', corruption, name))
            top1, _, n = ref.counts(files, native=True)
            check_half_right(top1, n)
            assert res['imagenet-c-bar']['errors'][corruption][str(sev)] == pytest.approx(
                100 - _pct(top1, n), abs=1e-9)
    # 3 of the 75 ImageNet-C sets: no mCE, and it says why; clean error from this run
    assert res['imagenet-c']['mCE'] is None and len(res['imagenet-c']['incomplete']) == 15
    assert res['imagenet-c']['clean_top1'] == res['imagenet']['top1']
    assert res['imagenet-c-bar']['mean_error'] is None
    assert res['imagenet-c']['num_images'] == 9 and res['imagenet-c-bar']['num_images'] == 6


def test_result_files(full_run):
    out, out_dir = full_run
    with open(out_dir / 'results.json') as f:
        on_disk = json.load(f)
    assert on_disk['benchmarks'] == json.loads(json.dumps(out['results']['benchmarks']))
    assert on_disk['model'] == MODEL and on_disk['checkpoint']['entry'] == 'state_dict'
    assert 'no resize' in json.dumps(on_disk['preprocessing'])
    with open(out_dir / 'results.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 + 3 + 2  # 4 small benchmarks, 3 C sets, 2 C-bar sets
    fog = next(r for r in rows if r['corruption'] == 'fog')
    assert float(fog['error']) == pytest.approx(
        on_disk['benchmarks']['imagenet-c']['errors']['fog']['3'], abs=1e-3)
    assert osp.getsize(out_dir / 'imagenet_c_errors.png') > 1000
    assert osp.getsize(out_dir / 'imagenet_c_bar_errors.png') > 1000


REAL_BUILD = classification.build_classifier


def _counting_model(monkeypatch, fail_after=None):
    """Make the runner's model count its forwards (batch sizes), optionally raising
    after ``fail_after`` of them (a run killed in the middle)."""
    calls = []
    real = REAL_BUILD

    def build(*args, **kwargs):
        model, info = real(*args, **kwargs)

        def hook(module, inputs):
            calls.append(inputs[0].shape[0])
            if fail_after is not None and len(calls) > fail_after:
                raise RuntimeError('simulated kill')
        model.register_forward_pre_hook(hook)
        return model, info
    monkeypatch.setattr(classification, 'build_classifier', build)
    return calls


def test_resume_skips_finished_sets(data, full_run, monkeypatch, tmp_path):
    cfg = _cfg(data, tmp_path / 'run', benchmarks=['imagenet-c'])  # 3 sets, 1 batch each
    _counting_model(monkeypatch, fail_after=2)
    with pytest.raises(RuntimeError, match='simulated kill'):
        run_evaluation(cfg)
    with open(tmp_path / 'run' / 'records.jsonl') as f:
        assert len(f.read().splitlines()) == 1 + 2  # fingerprint + 2 finished sets
    calls = _counting_model(monkeypatch)
    out = run_evaluation(cfg)
    assert out['skipped'] == ['imagenet-c/gaussian_noise/1', 'imagenet-c/gaussian_noise/2']
    assert out['evaluated'] == ['imagenet-c/fog/3'] and calls == [3]
    full = full_run[0]['results']['benchmarks']['imagenet-c']
    assert out['results']['benchmarks']['imagenet-c']['errors'] == full['errors']
    calls = _counting_model(monkeypatch)
    assert run_evaluation(cfg)['evaluated'] == [] and calls == []  # all done: no forward


def test_changed_run_is_refused(data, tmp_path):
    out = tmp_path / 'run'
    run_evaluation(_cfg(data, out, benchmarks=['imagenet-a']))
    other = save_model_checkpoint(str(tmp_path / 'other.pth'), seed=1)
    with pytest.raises(FingerprintMismatch, match='checkpoint_sha256'):
        run_evaluation(_cfg(data, out, benchmarks=['imagenet-a'], checkpoint=other))
    with pytest.raises(FingerprintMismatch, match='limit_per_set'):
        run_evaluation(_cfg(data, out, benchmarks=['imagenet-a'], limit_per_set=1))
    moved = str(tmp_path / 'elsewhere')
    shutil.copytree(osp.join(data['root'], 'imagenet-a'), moved)
    with pytest.raises(FingerprintMismatch, match='set imagenet-a was recorded from'):
        run_evaluation(_cfg(data, out, benchmarks=['imagenet-a'], data={'imagenet-a': moved}))


def test_limit_per_set(data, tmp_path):
    out = run_evaluation(_cfg(data, tmp_path, benchmarks=['imagenet', 'imagenet-c'],
                              limit_per_set=2))
    res = out['results']['benchmarks']
    assert res['imagenet']['num_images'] == 2 and res['imagenet-c']['num_images'] == 6
    assert out['results']['limit_per_set'] == 2
    for bad in (0, -1):  # every set would be empty
        with pytest.raises(ValueError, match='must be >= 1'):
            run_evaluation(_cfg(data, tmp_path / f'bad{bad}', benchmarks=['imagenet'],
                                limit_per_set=bad))


def _state_dict(seed=0):
    import timm
    torch.manual_seed(seed)
    return timm.create_model(MODEL).state_dict()


@pytest.mark.parametrize('edit,message', [
    (lambda sd: sd.pop('fc.weight'), r'missing keys \(1\): fc.weight'),
    (lambda sd: sd.__setitem__('extra.weight', torch.zeros(1)), r'unexpected keys \(1\): extra.weight'),
    (lambda sd: sd.__setitem__('fc.bias', torch.zeros(10)),
     r'shape mismatches \(1\): fc.bias \(10,\) vs model \(1000,\)'),
])
def test_checkpoint_that_does_not_fit(tmp_path, edit, message):
    sd = _state_dict()
    edit(sd)
    path = str(tmp_path / 'bad.pth')
    torch.save({'model': sd}, path)
    with pytest.raises(CheckpointError, match=message) as info:
        build_classifier(MODEL, path)
    assert '\n' not in str(info.value) and 'does not fit' in str(info.value)
    with pytest.raises(CheckpointError, match='does not exist'):
        build_classifier(MODEL, str(tmp_path / 'missing.pth'))


def test_checkpoint_prefers_ema_like_timm(tmp_path):
    plain, ema = _state_dict(0), _state_dict(1)
    path = str(tmp_path / 'train.pth')
    torch.save({'state_dict': {'module.' + k: v for k, v in plain.items()},
                'state_dict_ema': ema, 'epoch': 3}, path)
    model, info = build_classifier(MODEL, path)
    assert info['entry'] == 'state_dict_ema'
    assert torch.equal(model.state_dict()['fc.weight'], ema['fc.weight'])
    torch.save({'state_dict': {'module.' + k: v for k, v in plain.items()}}, path)
    model, info = build_classifier(MODEL, path)  # DDP prefix removed
    assert torch.equal(model.state_dict()['fc.weight'], plain['fc.weight'])


def test_convnext_dcls_checkpoint_through_the_filter(tmp_path):
    import timm

    import dcls_mm.models  # noqa: F401
    torch.manual_seed(0)
    src = timm.create_model('convnext_dcls_tiny', arch='atto').eval()
    path = str(tmp_path / 'dcls.pth')
    torch.save({'model': src.state_dict()}, path)
    model, _ = build_classifier('convnext_dcls_tiny', path, {'arch': 'atto'})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), src(x))
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith('head.')}
    torch.save({'model': sd}, path)
    with pytest.raises(CheckpointError, match=r'missing keys \(2\): head.weight, head.bias'):
        build_classifier('convnext_dcls_tiny', path, {'arch': 'atto'})


def test_unreadable_image_skipped_or_fatal(data, tmp_path):
    val = str(tmp_path / 'val')
    shutil.copytree(osp.join(data['root'], 'imagenet', 'val'), val)
    wnid = sorted(os.listdir(val))[0]
    bad = osp.join(val, wnid, 'broken.JPEG')
    with open(bad, 'wb') as f:
        f.write(b'\xff\xd8 this is not a JPEG')
    with pytest.warns(UserWarning, match='skipping unreadable image .*broken.JPEG'):
        out = run_evaluation(_cfg(data, tmp_path / 'skip', benchmarks=['imagenet'],
                                  data={'imagenet': val}))
    res = out['results']['benchmarks']['imagenet']
    assert res['unreadable'] == 1 and res['num_images'] == 6
    with pytest.raises(BadImageError, match=r'imagenet: unreadable image .*broken.JPEG'):
        run_evaluation(_cfg(data, tmp_path / 'fail', benchmarks=['imagenet'],
                            data={'imagenet': val}, on_bad_image='fail'))


@pytest.mark.parametrize('batch_size', [4, 1])  # in one batch, and across batches
def test_native_sets_must_have_one_size(data, tmp_path, batch_size):
    from PIL import Image
    root = str(tmp_path / 'c')
    shutil.copytree(osp.join(data['root'], 'imagenet-c', 'weather'), root)
    folder = osp.join(root, 'fog', '3')
    wnid = sorted(os.listdir(folder))[0]
    Image.new('RGB', (50, 40)).save(osp.join(folder, wnid, 'big.JPEG'))
    with pytest.raises(DataLayoutError, match=r'imagenet-c/fog/3: images of one set differ in '
                       r'size: .*big.JPEG is 50x40'):
        run_evaluation(_cfg(data, tmp_path / 'out', benchmarks=['imagenet-c'],
                            data={'imagenet-c': root}, batch_size=batch_size))


def test_a_set_with_no_readable_image_is_an_error(data, tmp_path):
    """No image to score: one clear error, and no record (a record of 0 images once
    made every later run of that folder fail on a None top-1)."""
    root = str(tmp_path / 'c')
    shutil.copytree(osp.join(data['root'], 'imagenet-c', 'weather'), root)
    folder = osp.join(root, 'fog', '3')
    count = 0
    for wnid in os.listdir(folder):
        for name in os.listdir(osp.join(folder, wnid)):
            with open(osp.join(folder, wnid, name), 'wb') as f:
                f.write(b'not an image')
            count += 1
    out = tmp_path / 'out'
    with pytest.warns(UserWarning, match='skipping unreadable image'):
        with pytest.raises(DataLayoutError,
                           match=f'imagenet-c/fog/3: none of its {count} images could be read'):
            run_evaluation(_cfg(data, out, benchmarks=['imagenet-c'], data={'imagenet-c': root}))
    assert 'fog/3' not in (out / 'records.jsonl').read_text()


def test_eval_geometry_is_the_benchmark_protocol_for_every_model():
    """Resize 256 / crop 224 (crop_pct 0.875), bicubic, whatever the model's default
    pretrained tag says (timm's convnext_tiny built without weights: crop_pct 0.95)."""
    import timm
    from timm.data import create_transform, resolve_data_config
    model = timm.create_model('convnext_tiny', pretrained=False)
    assert resolve_data_config({}, model=model)['crop_pct'] != 0.875  # the trap
    ev = classification.resolve_preprocessing(model)['eval']
    assert (ev['input_size'], ev['crop_pct'], ev['interpolation']) == ([3, 224, 224], 0.875,
                                                                        'bicubic')
    resize = create_transform(**{k: ev[k] for k in ('input_size', 'interpolation', 'mean',
                                                    'std', 'crop_pct', 'crop_mode')}).transforms[0]
    assert resize.size == 256


def test_cli_errors_are_one_line(data, tmp_path, capsys):
    cli = load_tool('tools/robustness/evaluate.py')
    cases = [
        (['--benchmark', 'imagenet-c', '--data-root', str(tmp_path)],
         'imagenet-c: folder'),
        (['--benchmark', 'imagenet', '--data', f'imagenet={data["root"]}'],
         'imagenet: unexpected folder'),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as info:
            cli.main([MODEL, '--checkpoint', data['ckpt'], '--out-dir', str(tmp_path / 'o'),
                      '--no-progress', '--workers', '0'] + extra)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('evaluate.py: error: ' + message) and '\n' not in err, err
    out = cli.main([MODEL, '--checkpoint', data['ckpt'], '--benchmark', 'imagenet-a',
                    '--data-root', data['root'], '--out-dir', str(tmp_path / 'ok'),
                    '--no-progress', '--workers', '0', '--batch-size', '3'])
    printed = capsys.readouterr().out
    assert 'A top-1' in printed and MODEL in printed
    assert out['results']['benchmarks']['imagenet-a']['num_images'] == 6


def test_named_data_folders_are_checked_also_under_all(data, tmp_path):
    """`--benchmark all` runs the benchmarks whose folders exist; a folder the user named
    must exist (it was skipped without a word), and a misspelt name is an error."""
    from dcls_mm.evaluation.classification import discover_sets
    names = {s.benchmark for s in discover_sets(['all'], data['root'], {})}
    assert 'imagenet-a' in names
    with pytest.raises(DataLayoutError, match='no_such'):
        discover_sets(['all'], data['root'], {'imagenet-a': str(tmp_path / 'no_such')})
    with pytest.raises(DataLayoutError, match='unknown benchmark.*imagenet_a'):
        discover_sets(['all'], data['root'], {'imagenet_a': osp.join(data['root'], 'imagenet-a')})
