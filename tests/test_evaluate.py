"""Evaluation: FID/KID equal clean-fid's, distributed = single process, reference-statistics cache, errors.

Inception is never needed: a small fixed random conv net (tests/feature_extractors.py) stands in through
clean-fid's own custom_feat_extractor interface; only the offline-error and loading paths of Inception are
exercised (with the download made to fail and a tiny TorchScript stand-in file).
"""

from __future__ import annotations

import functools
import os
import pickle
import urllib.error
from pathlib import Path

import feature_extractors as fx
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from cleanfid import fid as cleanfid
from PIL import Image

from waveforge import config, inference, jobs, metrics
from waveforge.config import EvalConfig
from waveforge.evaluator import Evaluator, sampling_speed
from waveforge.images import make_grid

CPU = torch.device("cpu")
SPEC = "feature_extractors:random_conv32"


def _write_folder(folder: Path, n: int, size: int, shift: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.random((size, size, 3)) * 180 + shift
        base[: size // 2] *= rng.random()  # some structure beyond i.i.d. noise
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    return _write_folder(root / "real", 48, 32, 0, seed=0), _write_folder(root / "fake", 40, 32, 45, seed=1)


def generate_images(seeds: list[int], size: int = 24) -> torch.Tensor:
    """A stand-in generator: image i depends on seed i only (as waveforge.diffusion.sample_from_seeds)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(1000 + s)
        img = torch.rand(3, size, size, generator=g) * 200 + (s % 7) * 8
        out.append(img.clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


def data_images(n: int = 40, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)


def extractor(mode: str = "clean", spec: str = SPEC) -> metrics.FeatureExtractor:
    return metrics.load_feature_extractor(EvalConfig(feature_extractor=spec, mode=mode), CPU)


# --------------------------------------------------------------------------------------------------
# Equality with clean-fid
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["clean", "legacy_pytorch", "legacy_tensorflow"])
def test_fid_between_folders_equals_cleanfid(folders, mode):
    real, fake = folders
    ours = metrics.fid_folders(real, fake, EvalConfig(feature_extractor=SPEC, mode=mode, batch_size=16, kid=False),
                                device=CPU, progress=False)
    theirs = cleanfid.compute_fid(str(real), str(fake), custom_feat_extractor=fx.random_conv32, mode=mode,
                                  device=CPU, num_workers=0, verbose=False)
    assert theirs > 1.0  # the sets differ: a meaningful comparison
    assert ours["fid_custom"] == pytest.approx(theirs, rel=1e-3)
    assert set(ours) == {"fid_custom"}  # another extractor's FID is never named like Inception's


def test_kid_equals_cleanfid_kernel_distance(folders):
    real, fake = folders
    ecfg = EvalConfig(feature_extractor=SPEC, batch_size=16, kid=True, kid_subsets=20, kid_subset_size=30)
    ours = metrics.fid_folders(real, fake, ecfg, device=CPU, progress=False)
    f_real = cleanfid.get_folder_features(str(real), fx.random_conv32, num_workers=0, device=CPU, verbose=False)
    f_fake = cleanfid.get_folder_features(str(fake), fx.random_conv32, num_workers=0, device=CPU, verbose=False)
    np.random.seed(0)  # our estimator draws its subsets with RandomState(0), as clean-fid does after seed(0)
    theirs = cleanfid.kernel_distance(f_real, f_fake, num_subsets=20, max_subset_size=30)
    assert ours["kid_custom"] == pytest.approx(theirs, rel=1e-4)
    assert ours["fid_custom"] == pytest.approx(cleanfid.fid_from_feats(f_real, f_fake), rel=1e-3)
    # all subsets = every sample once: the estimator is clean-fid's for any features
    feats1, feats2 = np.random.default_rng(0).normal(size=(2, 50, 8)).astype(np.float32)
    np.random.seed(3)
    assert metrics.kernel_distance(feats1, feats2 + 0.5, 5, 1000, seed=3) == pytest.approx(
        cleanfid.kernel_distance(feats1, feats2 + 0.5, 5, 1000), rel=1e-4)


def test_fid_of_a_set_against_itself_is_zero(folders):
    real, fake = folders
    out = metrics.fid_folders(real, real, EvalConfig(feature_extractor=SPEC, batch_size=16, kid=True,
                                                      kid_subset_size=30, kid_subsets=10),
                               device=CPU, progress=False)
    typical = metrics.fid_folders(real, fake, EvalConfig(feature_extractor=SPEC, batch_size=16, kid=True,
                                                          kid_subset_size=30, kid_subsets=10),
                                   device=CPU, progress=False)
    assert abs(out["fid_custom"]) < 1e-6 * typical["fid_custom"]
    # unbiased estimator over random subsets (x and y drawn independently from one set): ~0, either sign
    assert abs(out["kid_custom"]) < 0.01 * typical["kid_custom"]


def test_feature_stats_equal_numpy_mean_and_cov():
    feats = torch.randn(37, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1
    stats = metrics.FeatureStats(keep_features=True)
    for chunk, idx in zip(feats.split(10), torch.arange(37).split(10)):
        stats.add(chunk, indices=idx.tolist())
    s = stats.reduce()
    assert s.count == 37
    np.testing.assert_allclose(s.mu, feats.double().numpy().mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(s.features, feats.numpy())


# --------------------------------------------------------------------------------------------------
# Distributed (2 real gloo processes) = 1 process
# --------------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ext = extractor()
        fake = metrics.generate_features(generate_images, 23, ext, batch_size=3, kid=True, progress=False).reduce()
        images = data_images()
        share = images.chunk(world)[rank]  # contiguous shares: the gathered features keep the data order
        real = metrics.reference_stats(
            os.path.join(out_dir, "manifest.json"), lambda: iter(share.split(4)), ext, resolution=24,
            cache_url=os.path.join(out_dir, "cache"), kid=True, progress=False)
        scores = metrics.scores(real, fake, kid=True, kid_subsets=10, kid_subset_size=15)
        cached = metrics.reference_stats(  # the second time: read by every rank, features on rank 0 only
            os.path.join(out_dir, "manifest.json"), lambda: iter(()), ext, resolution=24,
            cache_url=os.path.join(out_dir, "cache"), kid=True, progress=False)
        cached_scores = metrics.scores(cached, fake, kid=True, kid_subsets=10, kid_subset_size=15)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump({"fake": fake, "real": real, "scores": scores, "cached": cached,
                         "cached_scores": cached_scores}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch + clean-fid: ~15-25 s on 2 loaded cores
def test_two_ranks_equal_one_rank(tmp_path):
    (tmp_path / "manifest.json").write_text('{"shards": ["a.tar"]}')
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    two = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]

    ext = extractor()
    fake = metrics.generate_features(generate_images, 23, ext, batch_size=5, kid=True, progress=False).reduce()
    images = data_images()
    real = metrics.reference_stats(str(tmp_path / "manifest.json"), lambda: iter(images.split(7)), ext,
                                    resolution=24, cache_url=str(tmp_path / "cache1"), kid=True, progress=False)
    scores = metrics.scores(real, fake, kid=True, kid_subsets=10, kid_subset_size=15)

    assert not two[0]["real"].cached  # computed by the two ranks together
    for r in range(2):  # every rank holds the same numbers
        assert two[r]["fake"].count == 23 and two[r]["real"].count == 40
        np.testing.assert_allclose(two[r]["fake"].mu, fake.mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(two[r]["fake"].sigma, fake.sigma, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(two[r]["fake"].features, fake.features, rtol=1e-5, atol=1e-6)  # sample order
        np.testing.assert_allclose(two[r]["real"].mu, real.mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(two[r]["real"].sigma, real.sigma, rtol=1e-6, atol=1e-9)
        assert two[r]["scores"]["fid"] == pytest.approx(scores["fid"], rel=1e-6)
        assert two[r]["scores"]["fid"] > 1.0
    # generated features are placed by sample index, so KID is independent of the rank count too (reference
    # features are gathered in rank order: here the data order, as the shares are contiguous)
    assert two[0]["scores"]["kid"] == pytest.approx(scores["kid"], rel=1e-5)
    assert two[0]["scores"] == two[1]["scores"]
    for r in range(2):
        assert two[r]["cached"].cached and two[r]["cached_scores"] == two[0]["scores"]
        np.testing.assert_array_equal(two[r]["cached"].sigma, two[0]["real"].sigma)
    assert two[0]["cached"].features is not None and two[1]["cached"].features is None


# --------------------------------------------------------------------------------------------------
# Reference statistics cache
# --------------------------------------------------------------------------------------------------


def test_reference_stats_are_computed_once_and_keyed_by_the_manifest(tmp_path, capsys):
    manifest = tmp_path / "data" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text('{"shards": ["shard-000000.tar"], "count": 40}')
    images = data_images()
    calls = []

    def iterate():
        calls.append(1)
        return iter(images.split(8))

    ext = extractor()
    ref = functools.partial(metrics.reference_stats, str(manifest), iterate, ext, resolution=24, num_samples=40,
                            progress=False)
    first = ref()
    assert calls == [1] and not first.cached and first.count == 40
    assert "reference statistics: computed 40 images" in capsys.readouterr().out
    # saved next to the data set by default: npz + a JSON with the key
    assert first.url.startswith(str(tmp_path / "data" / "fid-stats" / "ref-")) and Path(first.url).is_file()
    meta = Path(first.url).with_suffix(".json").read_text()
    assert '"features": "feature_extractors:random_conv32/clean"' in meta and '"resolution": 24' in meta

    second = ref()
    assert calls == [1] and second.cached and second.url == first.url
    assert f"reference statistics: cached {first.url}" in capsys.readouterr().out
    np.testing.assert_array_equal(second.mu, first.mu)
    np.testing.assert_array_equal(second.sigma, first.sigma)

    # KID needs the features: not in that file -> computed again (and stored); then cached with features
    with_feats = ref(kid=True)
    assert calls == [1, 1] and not with_feats.cached and with_feats.features.shape == (40, 32)
    again = ref(kid=True)
    assert calls == [1, 1] and again.cached
    np.testing.assert_array_equal(again.features, with_feats.features)

    # another resolution, extractor or sample count is another key (and the images must have that size)
    with pytest.raises(ValueError, match="images are 24x24 px but the generator makes 32x32"):
        ref(resolution=32)
    assert not metrics.reference_stats(str(manifest), lambda: iter([images.repeat(1, 1, 2, 2)]), ext,
                                        resolution=48, progress=False, num_samples=40).cached
    assert not ref(num_samples=39).cached
    assert not metrics.reference_stats(str(manifest), iterate, extractor(spec="feature_extractors:random_conv16"),
                                        resolution=24, num_samples=40, progress=False).cached
    n_calls = len(calls)
    manifest.write_text('{"shards": ["shard-000000.tar", "shard-000001.tar"], "count": 80}')
    changed = ref()
    assert len(calls) == n_calls + 1 and not changed.cached and changed.url != first.url


def test_evaluate_generator_against_a_shard_dataset(tmp_path, capsys, monkeypatch):
    """The trainer's call: recipe + generate(seeds) -> FID/KID against data.url, reference cached on disk."""
    from waveforge import data

    data.make_shards("synthetic", str(tmp_path / "shards"), 32, num_samples=30, workers=1, progress=False)
    cfg = config.load("tiny", {"data.url": str(tmp_path / "shards"), "eval.num_samples": 20, "eval.batch_size": 8,
                               "eval.features": "proxy", "eval.kid_subsets": 5, "eval.kid_subset_size": 10})
    generate = functools.partial(generate_images, size=32)
    first = Evaluator(cfg, CPU).fid(generate, progress=False)
    assert set(first) == {"fid_proxy", "kid_proxy"} and first["fid_proxy"] > 0
    assert "reference statistics: computed 20 images" in capsys.readouterr().out
    assert list((tmp_path / "shards" / "fid-stats").glob("ref-*.npz"))

    evaluator = Evaluator(cfg, CPU)  # a new evaluator (a new process): the file is read, once
    second = evaluator.fid(generate, progress=False)
    assert "reference statistics: cached" in capsys.readouterr().out
    assert second == pytest.approx(first, rel=1e-9)
    assert evaluator.fid(generate, progress=False) == pytest.approx(first, rel=1e-9)
    assert "reference statistics" not in capsys.readouterr().out  # kept in memory by the evaluator

    # same images from the data loader directly: the reference features are exactly the data set's
    ext = metrics.load_feature_extractor(cfg.eval, CPU)
    images = torch.cat(list(data.iterate_dataset(cfg.data.url, rank=0, world=1, batch_size=8, num_samples=20)))
    direct = metrics.FeatureStats()
    direct.add(ext(images))
    fake = metrics.generate_features(generate, 20, ext, 8, progress=False).reduce()
    assert metrics.fid_from_stats(direct.reduce(), fake) == pytest.approx(first["fid_proxy"], rel=1e-6)


def test_run_job_evaluates_an_exported_generator_and_folders(tmp_path, monkeypatch):
    """The evaluate job: an export folder's EMA generator against data.url, and two image folders."""
    import json

    import safetensors.torch

    from waveforge import data, models

    data.make_shards("synthetic", str(tmp_path / "shards"), 32, num_samples=24, workers=1, progress=False)
    cfg = config.load("tiny", {"data.url": str(tmp_path / "shards"), "eval.num_samples": 12, "eval.batch_size": 6,
                               "eval.features": "proxy", "eval.kid_subsets": 5, "eval.kid_subset_size": 10})
    torch.manual_seed(0)
    G = models.build_generator(cfg.model, cfg.diffusion).eval()
    export = tmp_path / "export"
    export.mkdir()
    safetensors.torch.save_model(G, str(export / inference.GENERATOR_FILE))
    (export / "model_config.json").write_text(json.dumps({
        "model": config.to_dict(cfg)["model"], "diffusion": config.to_dict(cfg)["diffusion"], "step": 7}))
    result = jobs.evaluate(cfg, checkpoint=str(export), out=str(tmp_path / "fid.json"))
    assert result["step"] == 7 and result["num_samples"] == 12 and result["fid_proxy"] > 0 and "kid_proxy" in result
    assert "fid" not in result and "not Inception" in result["features"]
    assert json.loads((tmp_path / "fid.json").read_text())["fid_proxy"] == result["fid_proxy"]
    direct = Evaluator(cfg, CPU).fid(inference.generator_fn(G, cfg, CPU), progress=False)
    assert direct["fid_proxy"] == pytest.approx(result["fid_proxy"], rel=1e-9)  # the same images as training's

    real, fake = _write_folder(tmp_path / "r", 12, 32, 0, 0), _write_folder(tmp_path / "f", 12, 32, 30, 1)
    folders = jobs.evaluate(cfg, real=str(real), fake=str(fake))
    assert folders["fid_proxy"] == pytest.approx(
        metrics.fid_folders(real, fake, cfg.eval, CPU, progress=False)["fid_proxy"])
    with pytest.raises(config.ConfigError, match="nothing to evaluate"):
        jobs.evaluate(cfg)
    with pytest.raises(config.ConfigError, match="cannot load a generator"):
        jobs.evaluate(cfg, checkpoint=str(tmp_path / "no-such-run"))


def test_reference_stats_in_object_storage_url(tmp_path):
    """Any fsspec URL works for the manifest and the cache (memory:// stands in for s3://)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/wf-test-bucket/data/manifest.json", b'{"shards": []}')
    images = data_images(12)
    ext = extractor()
    ref = functools.partial(metrics.reference_stats, "memory://wf-test-bucket/data/manifest.json",
                            lambda: iter([images]), ext, resolution=24, progress=False)
    try:
        first, second = ref(), ref()
        assert not first.cached and second.cached
        assert second.url.startswith("memory://wf-test-bucket/data/fid-stats/ref-")
        assert fs.exists(second.url.removeprefix("memory://").replace(".npz", ".json"))
    finally:
        fs.rm("/wf-test-bucket", recursive=True)


def test_reference_stats_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data manifest .* not found"):
        metrics.reference_stats(str(tmp_path / "nope.json"), lambda: iter([]), extractor(), resolution=24)


# --------------------------------------------------------------------------------------------------
# Inception loading (offline)
# --------------------------------------------------------------------------------------------------


def _fail_download(*args, **kwargs):
    raise urllib.error.URLError("no internet (test)")


def test_missing_inception_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "CLEANFID_INCEPTION_DIR", str(tmp_path))
    monkeypatch.setattr("cleanfid.downloads_helper.urllib.request.urlopen", _fail_download)
    with pytest.raises(metrics.InceptionUnavailable) as e:
        metrics.load_feature_extractor(EvalConfig(mode="clean"), CPU)
    msg = str(e.value)
    assert "inception-2015-12-05.pt" in msg and metrics.INCEPTION_URL in msg
    assert str(tmp_path / "inception-2015-12-05.pt") in msg and "eval.inception_path" in msg
    assert list(tmp_path.iterdir()) == []  # no partial file left where clean-fid looks

    with pytest.raises(metrics.InceptionUnavailable, match="eval.inception_path='/nowhere/x.pt': no such file"):
        metrics.load_feature_extractor(EvalConfig(inception_path="/nowhere/x.pt"), CPU)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fail_download)
    with pytest.raises(metrics.InceptionUnavailable, match="pt_inception-2015-12-05-6726825d.pth") as e:
        metrics.load_feature_extractor(EvalConfig(mode="legacy_pytorch"), CPU)
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(e.value)


class _TinyInception(torch.nn.Module):
    """The TorchScript interface of clean-fid's inception-2015-12-05.pt, with 2048 cheap features."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                          torch.nn.Linear(3, 2048))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x / 128 - 1)


def test_inception_path_loads_with_cleanfids_code(tmp_path, monkeypatch, folders):
    monkeypatch.setattr(metrics, "CLEANFID_INCEPTION_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr("cleanfid.downloads_helper.urllib.request.urlopen", _fail_download)
    net = torch.jit.script(_TinyInception())
    weights = tmp_path / "shared" / "my-inception-copy.pt"  # any name: linked to clean-fid's fixed name
    weights.parent.mkdir()
    net.save(str(weights))
    ext = metrics.load_feature_extractor(EvalConfig(inception_path=str(weights)), CPU)
    assert ext.name == "inception_v3/clean"
    images = data_images(3, 32)
    feats = ext(images)
    assert feats.shape == (3, 2048)
    expected = net.layers((ext.prepare_batch(images) - 128) / 128)  # clean-fid's normalization, 299 px input
    torch.testing.assert_close(feats, expected)
    # the folder form works too
    net.save(str(tmp_path / "shared" / "inception-2015-12-05.pt"))
    from_folder = metrics.load_feature_extractor(EvalConfig(inception_path=str(weights.parent)), CPU)
    assert from_folder(images).shape == (3, 2048)


def test_bad_feature_extractor_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        metrics.load_feature_extractor(EvalConfig(feature_extractor="no_such_module:f"), CPU)
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        metrics.load_feature_extractor(EvalConfig(feature_extractor="feature_extractors:nope"), CPU)
    with pytest.raises(config.ConfigError, match="eval.kid_subset_size"):
        config.load("tiny", {"eval.kid_subset_size": 1})
    with pytest.raises(ValueError, match=r"uint8 \(B,3,H,W\)"):
        metrics.generate_features(lambda s: torch.zeros(len(s), 3, 8, 8), 4, extractor(), 2, progress=False)


# --------------------------------------------------------------------------------------------------
# Grids and sampling speed
# --------------------------------------------------------------------------------------------------


def test_make_grid_tiles_images_row_major():
    images = torch.stack([torch.full((3, 4, 5), 10 * i, dtype=torch.uint8) for i in range(7)])
    grid = make_grid(images, nrow=3)
    assert grid.size == (3 * 5, 3 * 4) and grid.mode == "RGB"
    a = np.asarray(grid)
    assert a[0, 0, 0] == 0 and a[0, 5, 0] == 10 and a[4, 0, 0] == 30 and a[8, 0, 0] == 60
    assert a[8, 5, 0] == 0  # empty cell
    with pytest.raises(ValueError, match="uint8"):
        make_grid(images.float(), 3)
    # small samples are upscaled by a whole factor (nearest neighbour) to at least min_size px, the cells sharp
    big = np.asarray(make_grid(images, nrow=3, min_size=64))
    assert big.shape == (12 * 6, 15 * 6, 3)  # ceil(64 / 12) = 6
    assert (big[:6, :6] == 0).all() and (big[:6, 30:36] == 10).all() and (big[24:30, :6] == 30).all()


def test_sampling_speed_excludes_warmup():
    calls = []
    speed = sampling_speed(lambda: calls.append(1), batch_size=8, repeats=3, warmup=2)
    assert len(calls) == 5
    assert speed["images_per_s"] == pytest.approx(8 / speed["s_per_batch"])
