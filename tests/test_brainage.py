"""Brain age: the NIfTI pipeline (grid, reorientation, z-scoring, cache, named errors on bad input), the built-in
cohort's ageing model, the 3D models, the metrics against hand-worked values, and a tiny run end to end."""

import csv
import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
pytest.importorskip("nilearn")

from ermoe import create_model  # noqa: E402
from ermoe.data import cohort as cohort_mod  # noqa: E402
from ermoe.data import nifti  # noqa: E402
from ermoe.data.nifti import BrainDataError, mni_grid, preprocess, read_csv, split_cohort  # noqa: E402
from ermoe.tasks.brain_age import (age_metrics, cell_labels, correct_age_bias, expert_anatomy,  # noqa: E402
                                   fit_age_bias)

SPACING = 8.0  # a 24 x 28 x 24 grid keeps every test fast


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ERMOE_CACHE_DIR", str(tmp_path / "cache"))


def blob_image(centre_mm=(30.0, 0.0, 0.0), spacing=2.0, flip_x=False) -> "nib.Nifti1Image":
    """A 'brain' of value 1 with a bright cube (value 5) at ``centre_mm``, on the 2 mm MNI grid (RAS or LAS)."""
    shape, affine = mni_grid(spacing)
    world = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) @ affine[:3, :3].T + affine[:3, 3]
    data = (np.linalg.norm(world, axis=-1) < 60).astype(np.float32)
    data[np.abs(world - np.asarray(centre_mm)).max(-1) <= 6] = 5.0
    if flip_x:
        las = affine.copy()
        las[0, 0], las[0, 3] = -affine[0, 0], affine[0, 3] + affine[0, 0] * (shape[0] - 1)
        return nib.Nifti1Image(data[::-1].copy(), las)
    return nib.Nifti1Image(data, affine)


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_mni_grid_is_fsl_2mm_template_grid():
    shape, affine = mni_grid(2.0)
    assert shape == (91, 109, 91)
    np.testing.assert_array_equal(affine[:3, 3], [-90, -126, -72])
    np.testing.assert_array_equal(np.diag(affine)[:3], [2, 2, 2])
    assert mni_grid(4.0)[0] == (46, 55, 46)
    with pytest.raises(BrainDataError, match="spacing"):
        mni_grid(0)


def test_preprocess_reorients_and_zscores_inside_the_brain(tmp_path):
    nib.save(blob_image(), tmp_path / "ras.nii.gz")
    nib.save(blob_image(flip_x=True), tmp_path / "las.nii.gz")
    ras, las = preprocess(tmp_path / "ras.nii.gz", 4.0), preprocess(tmp_path / "las.nii.gz", 4.0)
    np.testing.assert_allclose(las, ras, atol=1e-5)  # the stored orientation does not matter
    brain = ras != 0
    assert abs(ras[brain].mean()) < 1e-5 and abs(ras[brain].std() - 1) < 1e-4
    _, affine = mni_grid(4.0)
    peak = np.unravel_index(np.argmax(ras), ras.shape)
    world = affine[:3, :3] @ np.asarray(peak) + affine[:3, 3]
    assert np.abs(world - [30, 0, 0]).max() <= 6  # the cube is where its MNI coordinates say (right hemisphere)


def test_cache_means_the_second_read_opens_no_nifti(tmp_path, monkeypatch):
    nib.save(blob_image(), tmp_path / "a.nii.gz")
    expected = preprocess(tmp_path / "a.nii.gz", 4.0)
    first = nifti.cached_volume(tmp_path / "a.nii.gz", 4.0)
    np.testing.assert_allclose(np.load(first), expected, rtol=1e-3, atol=1e-3)  # float16 on disk
    monkeypatch.setattr(nifti, "preprocess", lambda *a: pytest.fail("preprocessed twice"))
    assert nifti.cached_volume(tmp_path / "a.nii.gz", 4.0) == first
    store = nifti.VolumeStore(read_csv(write_csv(tmp_path / "c.csv", [{"path": "a.nii.gz", "age": "50"}])), 4.0)
    assert store.get([0]).shape == (1, 1, 46, 55, 46)


@pytest.mark.parametrize("problem, match", [
    ("missing_column", "missing column"), ("bad_age", "is not a number"), ("negative_age", "finite number >= 0"),
    ("missing_file", "does not exist"), ("bad_split", "split"),
])
def test_csv_errors_name_the_problem(tmp_path, problem, match):
    nib.save(blob_image(), tmp_path / "a.nii.gz")
    row = {"path": "a.nii.gz", "age": "50"}
    if problem == "missing_column":
        row = {"file": "a.nii.gz", "age": "50"}
    elif problem == "bad_age":
        row["age"] = "fifty"
    elif problem == "negative_age":
        row["age"] = "-3"
    elif problem == "missing_file":
        row["path"] = "gone.nii.gz"
    elif problem == "bad_split":
        row["split"] = "holdout"
    with pytest.raises((BrainDataError, FileNotFoundError), match=match):
        read_csv(write_csv(tmp_path / "c.csv", [row]))


def test_one_scan_listed_twice_is_refused_however_it_is_written(tmp_path):
    """Issue 42: the same file on two rows (two subjects, two ages, or two splits: leakage) is a named error with
    the lines, also when one row names it through another path (./a, a link)."""
    nib.save(blob_image(), tmp_path / "a.nii.gz")
    nib.save(blob_image(), tmp_path / "b.nii.gz")
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    rows = [{"path": "a.nii.gz", "age": "65.4", "subject": "s1", "split": "train"},
            {"path": "b.nii.gz", "age": "70", "subject": "s2", "split": "train"},
            {"path": "./a.nii.gz", "age": "70.0", "subject": "s3", "split": "test"}]
    with pytest.raises(BrainDataError, match=r"1 image file\(s\) listed more than once: .*a.nii.gz on lines 2, 4\. "
                                             r"A scan listed twice .*leakage"):
        read_csv(write_csv(tmp_path / "c.csv", rows))
    rows[2]["path"] = "link.nii.gz"
    with pytest.raises(BrainDataError, match="on lines 2, 4"):
        read_csv(write_csv(tmp_path / "c.csv", rows))
    assert len(read_csv(write_csv(tmp_path / "c.csv", rows[:2]))) == 2


def test_bad_images_are_named_errors(tmp_path):
    (tmp_path / "corrupt.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 10))
    with pytest.raises(BrainDataError, match="corrupt.nii.gz: not a readable NIfTI"):
        preprocess(tmp_path / "corrupt.nii.gz", 4.0)
    _, affine = mni_grid(2.0)
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10, 3), np.float32), affine), tmp_path / "4d.nii.gz")
    with pytest.raises(BrainDataError, match="4D image"):
        preprocess(tmp_path / "4d.nii.gz", 4.0)
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), affine), tmp_path / "empty.nii.gz")
    with pytest.raises(BrainDataError, match="every voxel is zero"):
        preprocess(tmp_path / "empty.nii.gz", 4.0)
    nan = np.ones((10, 10, 10), np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), tmp_path / "nan.nii.gz")
    with pytest.raises(BrainDataError, match="NaN"):
        preprocess(tmp_path / "nan.nii.gz", 4.0)
    far = affine.copy()
    far[:3, 3] += 1000  # millimetres far outside MNI space
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), far), tmp_path / "far.nii.gz")
    with pytest.raises(BrainDataError, match="registered to MNI"):
        preprocess(tmp_path / "far.nii.gz", 4.0)


def test_split_by_subject_and_leakage_is_refused(tmp_path):
    nib.save(blob_image(), tmp_path / "a.nii.gz")
    for i in range(20):  # (one file per row: a file listed twice is refused)
        shutil.copyfile(tmp_path / "a.nii.gz", tmp_path / f"a{i}.nii.gz")
    rows = [{"path": f"a{i}.nii.gz", "age": str(40 + i), "subject": f"s{i // 2}"} for i in range(20)]  # 2 scans each
    scans = read_csv(write_csv(tmp_path / "c.csv", rows))
    cohort = split_cohort(scans, val_size=2, test_size=3, seed=0)
    subjects = [{s.subject for s in cohort.split(n)} for n in ("train", "val", "test")]
    assert [len(s) for s in subjects] == [5, 2, 3] and not (subjects[0] & subjects[1] | subjects[0] & subjects[2])
    assert split_cohort(scans, 2, 3, 0).val == cohort.val  # fixed by the seed
    leaky = [{**r, "split": "train" if i != 1 else "test"} for i, r in enumerate(rows)]
    with pytest.raises(BrainDataError, match="subject 's0' appears in splits"):
        split_cohort(read_csv(write_csv(tmp_path / "l.csv", leaky)))
    with pytest.raises(BrainDataError, match="split column"):
        split_cohort(read_csv(write_csv(tmp_path / "s.csv", [{**r, "split": "train"} for r in rows])), val_size=1)


def test_ageing_model_rates():
    # a constant 0.85 %/yr for 30 years: exp(-0.255)
    assert cohort_mod.retained(50, cohort_mod.hippocampus_rate) == pytest.approx(math.exp(-0.255), rel=1e-6)
    assert cohort_mod.retained(20, cohort_mod.gm_rate) == 1.0
    assert cohort_mod.gm_rate(np.array([35.0, 70.0])) == pytest.approx([0.32, 0.55])
    assert cohort_mod.wm_rate(np.array([35.0, 70.0])) == pytest.approx([0.02, 0.47])
    assert cohort_mod.CohortSpec(bio_sd=2.0).floor_mae() == pytest.approx(2.0 * math.sqrt(2 / math.pi))
    t = cohort_mod.Templates(6.0)
    world = t.world_mm()
    young, _ = cohort_mod.aged_tissue(t, 30, world)
    old, displacement = cohort_mod.aged_tissue(t, 80, world)
    gm_young, gm_old = young[0].sum(), old[0].sum()
    expected = (t.gm * (1 - t.hippocampus)).sum() * cohort_mod.retained(80, cohort_mod.gm_rate) + \
        (t.gm * t.hippocampus).sum() * cohort_mod.retained(80, cohort_mod.hippocampus_rate)
    assert gm_old == pytest.approx(expected, rel=1e-4) and gm_old < gm_young
    assert old[2].sum() > young[2].sum()  # lost tissue becomes CSF
    # the ventricles expand: near their centre each point samples from closer to it (outward growth)
    offset = world - t.ventricle_centre
    near = (offset ** 2).sum(-1) < t.ventricle_radius ** 2
    assert near.any() and ((displacement * offset).sum(-1)[near] < 0).all() and np.abs(displacement).max() > 1.0
    warped = cohort_mod._warp(old[2:3], displacement, 6.0)[0]
    assert warped[near].sum() > old[2][near].sum()  # more CSF around the ventricle centre than without expansion


def test_built_in_cohort_reads_through_the_nifti_pipeline():
    spec = cohort_mod.CohortSpec(size=6, seed=3, spacing=SPACING)
    path = cohort_mod.build_cohort(spec)
    scans = read_csv(path)
    assert len(scans) == 6 and all(20 <= s.age <= 85 for s in scans)
    assert cohort_mod.build_cohort(spec) == path  # cached
    info = json.loads((path.parent / "cohort.json").read_text())
    assert info["floor_mae"] == pytest.approx(spec.floor_mae())
    vol = preprocess(scans[0].path, SPACING)
    assert vol.shape == mni_grid(SPACING)[0] and (vol != 0).sum() > 1000
    assert (path.parent / "age_map.nii.gz").is_file() and (path.parent / "tissue.nii.gz").is_file()


def test_heterogeneous_ageing_patterns_differ_where_the_generator_says():
    t = cohort_mod.Templates(6.0)
    world = t.world_mm()
    hip = cohort_mod.AgeingRates.of("hippocampal")
    vent = cohort_mod.AgeingRates.of("ventricular")
    old_hip, disp_hip = cohort_mod.aged_tissue(t, 80, world, rates=hip)
    old_vent, disp_vent = cohort_mod.aged_tissue(t, 80, world, rates=vent)
    # hippocampal-predominant: the hippocampus loses GM at 2.5 x 0.85 %/yr; weighted by the hippocampus map,
    # sum(gm h ((1 - h) g + h k)) with g the cortical and k the hippocampal share retained at 80
    k = cohort_mod.retained(80, lambda a: 2.5 * cohort_mod.hippocampus_rate(a))
    g = cohort_mod.retained(80, cohort_mod.gm_rate)
    h = t.hippocampus
    assert (old_hip[0] * h).sum() == pytest.approx((t.gm * h * ((1 - h) * g + h * k)).sum(), rel=1e-4)
    assert (old_hip[0] * t.hippocampus).sum() < (old_vent[0] * t.hippocampus).sum()
    # ventricle-predominant: the ventricles expand more (a larger displacement), white matter thins faster
    assert np.abs(disp_vent).max() > np.abs(disp_hip).max() and old_vent[1].sum() < old_hip[1].sum()
    # men lose cortical GM faster than women
    men, women = (cohort_mod.aged_tissue(t, 80, world, rates=cohort_mod.AgeingRates.of("hippocampal", sex))[0][0]
                  for sex in ("M", "F"))
    assert men.sum() < women.sum()
    # pattern_strength raises each multiplier to its power: further apart, the sexes' GM rate untouched
    strong = cohort_mod.AgeingRates.of("hippocampal", "M", strength=2.0)
    assert (strong.hippocampus, strong.ventricle, strong.wm, strong.gm) == (6.25, 0.25, 1.0, 1.15)
    assert cohort_mod.AgeingRates.of("ventricular", strength=2.0).ventricle == 4.0
    from ermoe.data.modules import BrainCohortOptions
    with pytest.raises(ValueError, match="heterogeneous only"):
        BrainCohortOptions(pattern_strength=2.0)
    with pytest.raises(ValueError, match="must be > 0"):
        BrainCohortOptions(ageing="heterogeneous", pattern_strength=0.0)
    # the default rates are the homogeneous cohort's, unchanged
    np.testing.assert_array_equal(cohort_mod.aged_tissue(t, 80, world)[0],
                                  cohort_mod.aged_tissue(t, 80, world, rates=cohort_mod.AgeingRates())[0])


def test_heterogeneous_cohort_writes_its_patterns_and_maps_and_keeps_the_homogeneous_key():
    import hashlib
    from dataclasses import asdict

    spec = cohort_mod.CohortSpec(size=8, seed=3, spacing=SPACING, ageing="heterogeneous")
    path = cohort_mod.build_cohort(spec)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["pattern"] for r in rows} <= set(cohort_mod.PATTERNS) and len({r["pattern"] for r in rows}) == 2
    pattern_map = np.asarray(nib.load(path.parent / "pattern_map.nii.gz").dataobj)
    assert set(np.unique(pattern_map)) == {0, 1, 2}
    hip_map = np.asarray(nib.load(path.parent / "age_map_hippocampal.nii.gz").dataobj)
    t = cohort_mod.Templates(SPACING)
    # the hippocampal pattern's cells lie where the hippocampus is
    assert t.hippocampus[pattern_map == 1].mean() > 5 * t.hippocampus[pattern_map == 2].mean()
    assert (hip_map[pattern_map == 1] > 0).all()
    # the fields of the cohorts built before ageing and pattern_strength were settings: their keys do not move
    old = {k: v for k, v in asdict(cohort_mod.CohortSpec()).items() if k not in ("ageing", "pattern_strength")}
    key = hashlib.sha256(json.dumps({**old, "v": cohort_mod.COHORT_VERSION}, sort_keys=True).encode()).hexdigest()
    assert cohort_mod.cohort_dir(cohort_mod.CohortSpec()).name == key[:16]
    hetero = {**old, "ageing": "heterogeneous"}
    key = hashlib.sha256(json.dumps({**hetero, "v": cohort_mod.COHORT_VERSION}, sort_keys=True).encode()).hexdigest()
    assert cohort_mod.cohort_dir(cohort_mod.CohortSpec(ageing="heterogeneous")).name == key[:16]
    assert cohort_mod.cohort_dir(cohort_mod.CohortSpec(ageing="heterogeneous", pattern_strength=2.0)).name != key[:16]
    with pytest.raises(ValueError, match="data.ageing must be one of"):
        cohort_mod.build_cohort(cohort_mod.CohortSpec(ageing="fast"))


def test_map_and_subject_agreement_are_chance_corrected_by_hand():
    from sklearn.metrics import adjusted_mutual_info_score

    from ermoe.tasks.brain_age import map_agreement, pattern_routing

    # 4 brain cells + 1 outside; the expert map (majority per cell) is 0, 0, 1, 1 and the truth 1, 1, 2, 2: AMI 1
    counts = np.array([[5, 4, 0, 1, 9], [0, 1, 7, 6, 0]])
    brain = np.array([True, True, True, True, False])
    assert map_agreement(counts, np.array([1, 1, 2, 2, 0]), brain) == pytest.approx(1.0)
    # a map that matches by chance only: AMI about 0 (negative allowed), far below the raw MI
    truth = np.array([1, 2, 1, 2, 0])
    assert map_agreement(counts, truth, brain) == pytest.approx(
        adjusted_mutual_info_score([0, 0, 1, 1], [1, 2, 1, 2]))
    # subject patterns: expert 0 takes pattern 0's tokens in the pattern cells, expert 1 pattern 1's
    cells = np.array([1, 2, 0])
    by = np.zeros((2, 2, 3), dtype=int)
    by[0, 0, :2], by[1, 1, :2] = 10, 10
    by[:, :, 2] = 7  # a cell where the patterns age alike: left out of the subject AMI
    out = pattern_routing(by.reshape(2, 6), cells, np.array([True, True, True]))
    assert out["pattern_subject_ami"] == pytest.approx(1.0) and out["expert_pattern_counts"] == [[20, 0], [0, 20]]
    assert math.isnan(pattern_routing(np.ones((1, 6), dtype=int), cells, np.ones(3, bool))["pattern_subject_ami"])


def test_tiny_heterogeneous_run_scores_experts_against_the_pattern_maps(tmp_path):
    from ermoe.train import load_config, train

    cfg = load_config(None, {
        "task": "brain_age", "out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False,
        "probe_size": 4,
        "data": {"name": "brain_cohort", "cohort_size": 24, "spacing": SPACING, "val_size": 4, "test_size": 8,
                 "ageing": "heterogeneous"},
        "model": {"name": "sfcn3d", "channels": [4, 8, 8], "moe": {"router": "ermoe", "num_experts": 2}},
        "optim": {"epochs": 1, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 1}})
    run = train(cfg, quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    layer = metrics["layers"]["cells.0"]
    assert metrics["cohort"]["ageing"] == "heterogeneous"
    assert {"pattern_map_ami", "pattern_subject_ami", "age_map_ami"} <= set(layer)
    table = np.asarray(layer["expert_pattern_counts"])
    assert table.shape == (2, 2) and table.sum() > 0
    # the pattern probe reads the cells where the patterns differ, of every training, validation and test volume
    probe = metrics["pattern_probe"]["cells.0"]
    assert probe["chance"] == 0.5 and probe["cells"] > 0
    assert probe["tokens"] == {"train": 12 * probe["cells"], "val": 4 * probe["cells"], "test": 8 * probe["cells"]}
    from ermoe.study.examples import EXAMPLE_STATISTICS
    from ermoe.train.run import Run
    examples = Run(run).read_examples()  # per test volume: what the study's bootstrap resamples
    ones = np.ones((1, 8))
    assert EXAMPLE_STATISTICS["test_mae"](examples, ones)[0] == pytest.approx(metrics["test_mae"], rel=1e-12)
    assert EXAMPLE_STATISTICS["load_cv"](examples, ones)[0] == pytest.approx(layer["load_cv"], rel=1e-12)
    assert examples["load/cells.0"].sum(0).tolist() == layer["tokens_per_expert"]
    with pytest.raises(Exception, match="data.ageing must be one of"):
        load_config(None, {"task": "brain_age", "data": {"name": "brain_cohort", "ageing": "fast"}})


def test_age_metrics_and_bias_correction_by_hand():
    age = np.array([20.0, 40.0, 60.0, 80.0])
    pred = np.array([22.0, 41.0, 57.0, 80.0])
    m = age_metrics(pred, age)
    assert m["test_mae"] == pytest.approx(1.5) and m["test_rmse"] == pytest.approx(math.sqrt(14 / 4))
    assert m["test_gap_mean"] == pytest.approx(0.0)
    # regression to the mean: pred = 0.8 * age + 10, gap = 10 - 0.2 age, which the fit recovers and removes
    biased = 0.8 * age + 10
    a, b = fit_age_bias(biased, age)
    assert (a, b) == pytest.approx((10.0, -0.2))
    np.testing.assert_allclose(correct_age_bias(biased, age, (a, b)), age, atol=1e-9)


def test_expert_anatomy_mutual_information_by_hand():
    # 4 cells: csf, gm, wm, wm; expert 0 takes the gm cell only, expert 1 the others
    tissue = np.array([1, 2, 3, 3])
    counts = np.array([[0, 10, 0, 0], [10, 0, 10, 10]])
    out = expert_anatomy(counts, tissue, age_map_N=np.array([0.0, 1.0, 0.0, 0.0]))
    p_gm = 0.25  # H(tissue) = H(.25,.25,.5) = 1.5; H(tissue | expert) = .75 * H(1/3, 2/3) = .75 * 0.9183
    assert out["mi_tissue_bits"] == pytest.approx(1.5 - 0.75 * 0.918296, abs=1e-5)
    assert out["expert_tissue_counts"] == [[0, 0, 10, 0], [0, 10, 0, 20]]
    # the sensitive cell (top quarter) is the gm one: expert 0 holds all of it, enrichment 1 / p_gm
    assert out["age_expert_enrichment"] == pytest.approx(1 / p_gm)
    labels = cell_labels(np.array([[[0, 2], [2, 2]], [[3, 3], [3, 1]]]), (2, 1, 1), 4)
    np.testing.assert_array_equal(labels, [2, 3])


def test_sfcn_moe_routes_cells_in_x_major_order_and_the_dense_ffn_matches_in_size():
    torch.manual_seed(0)
    model = create_model("sfcn3d", volume_shape=(16, 16, 16), channels=[4, 8, 8],
                         moe={"router": "ermoe", "num_experts": 2}, moe_stages=[1]).eval()
    assert model.token_grid == {"cells.1": (4, 4, 4)}
    seen = {}
    layer = model.cells["1"]
    layer.moe.register_forward_pre_hook(lambda m, a: seen.setdefault("tokens", a[0]))
    x = torch.randn(2, 1, 16, 16, 16)
    model(x)
    fmap = model.stages[1](model.stages[0](x))
    tokens = layer.norm(fmap.flatten(2).transpose(1, 2))
    torch.testing.assert_close(seen["tokens"], tokens)
    torch.testing.assert_close(tokens[1, 1 * 16 + 2 * 4 + 3], layer.norm(fmap[1, :, 1, 2, 3]))  # cell (1, 2, 3)
    dense = create_model("sfcn3d", volume_shape=(16, 16, 16), channels=[4, 8, 8], dense_ffn=True, moe_stages=[1])
    assert dense.routed_layers() == [] and sum(p.numel() for p in dense.parameters()) < \
        sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="dense_ffn is the dense counterpart"):
        create_model("sfcn3d", dense_ffn=True, moe={"router": "ermoe"})
    with pytest.raises(ValueError, match="moe_stages places"):
        create_model("sfcn3d", moe_stages=[1])
    with pytest.raises(ValueError, match="placement and moe.blocks apply to transformer"):
        create_model("sfcn3d", moe={"router": "ermoe", "placement": "parallel"})
    with pytest.raises(ValueError, match="placement and moe.blocks apply to transformer"):
        create_model("sfcn3d", moe={"router": "ermoe", "blocks": "all"})


def test_vit3d_patch_tokens_and_reference_grid():
    torch.manual_seed(0)
    model = create_model("vit3d", volume_shape=(15, 16, 17), patch_size=4, embed_dim=16, depth=2, num_heads=2,
                         moe={"router": "ermoe", "num_experts": 2})
    assert model.patch_embed.grid_size == (3, 4, 4) and model.pos_embed.shape[1] == 48 + 1
    x = torch.randn(2, 1, 15, 16, 17)
    tokens = model.patch_embed(x)
    crop = x[:, :, 1:13, 0:16, 0:16]  # centred crop to whole patches: (15 - 12) // 2 = 1 on the first axis
    expected = torch.nn.functional.conv3d(crop, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=4)
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2))
    assert model(x).shape == (2, 1) and set(model.token_grid) == {v.name for v in model.routed_layers()}
    with pytest.raises(ValueError, match="expected volumes of shape"):
        model.patch_embed(torch.randn(1, 1, 8, 8, 8))
    assert create_model("vit3d", depth=1, embed_dim=8, num_heads=1).patch_embed.grid_size == (13, 15, 13)


@pytest.mark.parametrize("model, layer_name", [
    ({"name": "sfcn3d", "channels": [4, 8, 8], "moe": {"router": "ermoe", "num_experts": 2}}, "cells.0"),
    ({"name": "vit3d", "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2,
      "moe": {"router": "emoe", "num_experts": 2, "blocks": [1]}}, "blocks.1.mlp.branch"),
])
def test_tiny_brain_age_run_end_to_end(tmp_path, model, layer_name):
    from ermoe.train import load_config, train

    cfg = load_config(None, {
        "task": "brain_age", "out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False,
        "probe_size": 4, "probe_every": 2,
        "data": {"name": "brain_cohort", "cohort_size": 24, "spacing": SPACING, "val_size": 4, "test_size": 4},
        "model": model, "optim": {"epochs": 2, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 1}})
    run = train(cfg, quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_scans"] == 4 and metrics["step"] == 4
    for key in ("test_mae", "test_rmse", "test_r", "test_corrected_mae", "val_mae", "test_mae_mean_predictor"):
        assert math.isfinite(metrics[key]), key
    # the end of epoch 0 logs the headline measure (the MAE) through the Task's shared quick_eval
    epoch_end = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "eval"][0]
    assert epoch_end["step"] == 2 and math.isfinite(epoch_end["val_mae"]) and epoch_end["val_mae"] > 0
    layer = metrics["layers"][layer_name]
    assert sum(layer["tokens_per_expert"]) == 4 * int(np.prod(layer["token_grid"]))
    assert "mi_age_bits" in layer and "probe_changed" in layer
    assert (run / "figures" / f"expert_maps_{layer_name.replace('.', '_')}.png").is_file()


def test_nifti_csv_by_someone_else_trains(tmp_path):
    from ermoe.train import load_config, train

    rows = []
    for i in range(12):
        image = blob_image(centre_mm=(30.0 - 4 * i, 0.0, 0.0), spacing=4.0, flip_x=i % 2 == 1)
        nib.save(image, tmp_path / f"scan{i}.nii.gz")
        rows.append({"path": f"scan{i}.nii.gz", "age": str(30 + 4 * i), "subject": f"p{i}", "site": "A",
                     "split": "test" if i in (3, 8) else "val" if i in (5, 10) else "train"})
    path = write_csv(tmp_path / "mine.csv", rows)
    cfg = load_config(None, {
        "task": "brain_age", "out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False,
        "probe_size": 2, "data": {"name": "nifti_csv", "csv": str(path), "spacing": SPACING},
        "model": {"name": "sfcn3d", "channels": [4, 8, 8]},
        "optim": {"epochs": 1, "batch_size": 4, "eval_batch_size": 4, "warmup_steps": 1}})
    metrics = json.loads((train(cfg, quiet=True) / "metrics.json").read_text())
    assert metrics["test_scans"] == 2 and metrics["layers"] == {}
    from ermoe.train import ConfigError
    with pytest.raises(ConfigError, match="data.test_size must be >= 0, got -1"):
        load_config(None, {"task": "brain_age", "data": {"name": "nifti_csv", "csv": str(path), "test_size": -1},
                           "model": {"name": "sfcn3d"}})
    with pytest.raises(ConfigError, match="data.cohort_size does not apply"):
        load_config(None, {"task": "brain_age", "data": {"name": "nifti_csv", "csv": str(path), "cohort_size": 5},
                           "model": {"name": "sfcn3d"}})


def test_soft_label_bins_by_hand():
    from ermoe.tasks.brain_age import age_bins, soft_labels

    centres = age_bins(np.array([42.3, 81.6]), 1.0, 3.0)
    assert centres[0] == 39.0 and centres[-1] == 85.0 and len(centres) == 47  # SFCN-style 1-year bins
    c = torch.from_numpy(centres)
    labels = soft_labels(torch.tensor([60.0, 60.5]), c, 1.0)
    assert torch.allclose(labels.sum(1), torch.ones(2)) and int(labels[0].argmax()) == 21  # the 60-year bin
    assert float(labels[0] @ c) == pytest.approx(60.0, abs=1e-4) and float(labels[1] @ c) == pytest.approx(60.5,
                                                                                                           abs=1e-4)
    np.testing.assert_allclose(labels[0, 20] / labels[0, 21], math.exp(-0.5), rtol=1e-5)


def test_soft_bins_run_and_task_option_errors(tmp_path):
    from ermoe.train import ConfigError, load_config, train

    base = {"task": "brain_age", "out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False,
            "probe_size": 4, "data": {"name": "brain_cohort", "cohort_size": 16, "spacing": SPACING, "val_size": 4,
                                      "test_size": 4},
            "model": {"name": "sfcn3d", "channels": [4, 8, 8]},
            "optim": {"epochs": 1, "batch_size": 4, "eval_batch_size": 8, "warmup_steps": 1}}
    run = train(load_config(None, {**base, "task_options": {"loss": "soft_bins", "bin_width": 2.0}}), quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(metrics["test_mae"])
    with pytest.raises(ConfigError, match="bin_width and bin_sigma apply to loss soft_bins only"):
        load_config(None, {**base, "task_options": {"bin_width": 2.0}})
    with pytest.raises(ConfigError, match="unknown config key 'task_options.bins'"):
        load_config(None, {**base, "task_options": {"bins": 2}})
    with pytest.raises(ConfigError, match="task_options do not apply to task 'classification'"):
        load_config(None, {"data": {"name": "digits"}, "task_options": {"loss": "l1"}})


def test_missing_brain_extra_is_a_clear_error(monkeypatch):
    import sys
    from ermoe.train import create_task, load_config

    cfg = load_config(None, {"task": "brain_age", "data": {"name": "brain_cohort"}, "model": {"name": "sfcn3d"}})
    monkeypatch.setitem(sys.modules, "nilearn", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[brain\]'"):
        create_task(cfg, torch.device("cpu")).load()


def test_precise_bn_matches_a_float64_reference():
    """recalibrate_batchnorm: each BatchNorm's statistics become the equal-weight average of its batch statistics
    (mean; unbiased variance) under the current weights, everything else stays in eval mode and untouched."""
    from ermoe.train.precise_bn import recalibrate_batchnorm, trainable_batchnorms

    torch.manual_seed(0)
    model = create_model("sfcn3d", volume_shape=(16, 16, 16), channels=[4, 8, 8],
                         moe={"router": "ermoe", "num_experts": 2, "router_kwargs": {"standardize": True}})
    model.head_drop = torch.nn.Dropout(0.5)
    batches = [(torch.randn(3, 1, 16, 16, 16),) for _ in range(3)]
    router_stats = {k: v.clone() for k, v in model.named_buffers() if "standardizer" in k}
    conv, bn = model.stages[0][0], model.stages[0][1]
    with torch.no_grad():
        acts = [conv.double()(b[0].double()) for b in batches]
    conv.float()
    want_mean = torch.stack([a.mean(dim=(0, 2, 3, 4)) for a in acts]).mean(0)
    want_var = torch.stack([a.transpose(0, 1).reshape(4, -1).var(dim=1) for a in acts]).mean(0)
    assert not torch.allclose(bn.running_mean.double(), want_mean, atol=1e-3)  # the check can fail
    model.train()
    assert recalibrate_batchnorm(model, batches) == 3
    torch.testing.assert_close(bn.running_mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), want_var, rtol=1e-5, atol=1e-6)
    assert all(m.momentum == 0.1 for m in trainable_batchnorms(model)) and model.training and model.head_drop.training
    for k, v in model.named_buffers():  # routing state did not move
        if k in router_stats:
            torch.testing.assert_close(v, router_stats[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorm(model, [])


def test_checkpoints_hold_recalibrated_bn_statistics(tmp_path):
    from ermoe.train import ConfigError, load_config, train
    from ermoe.train.precise_bn import recalibrate_batchnorm
    from ermoe.train.trainer import load_run

    values = {"task": "brain_age", "out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False,
              "probe_size": 4, "bn_recalibration": 2,
              "data": {"name": "brain_cohort", "cohort_size": 24, "spacing": SPACING, "val_size": 4, "test_size": 4},
              "model": {"name": "sfcn3d", "channels": [4, 8, 8]},
              "optim": {"epochs": 2, "batch_size": 4, "eval_batch_size": 4, "warmup_steps": 1}}
    run = train(load_config(None, values), quiet=True)
    cfg, task, model, _, _ = load_run(run)
    stored = {k: v.clone() for k, v in model.named_buffers() if "running" in k}
    model.train()
    recalibrate_batchnorm(model, [b.inputs for b in task.eval_batches("train", 4, limit=8)])
    for k, v in model.named_buffers():  # recomputing from the same two batches changes nothing
        if k in stored:
            torch.testing.assert_close(v, stored[k], rtol=1e-5, atol=1e-6)
    values["out_dir"] = str(tmp_path / "no_recal")
    values["bn_recalibration"] = 0
    ema = json.loads((train(load_config(None, values), quiet=True) / "metrics.json").read_text())
    assert ema["test_mae"] != json.loads((run / "metrics.json").read_text())["test_mae"]
    vit = {**values, "bn_recalibration": 2, "model": {"name": "vit3d", "patch_size": 4, "embed_dim": 16, "depth": 1,
                                                      "num_heads": 2}}
    with pytest.raises(ConfigError, match="bn_recalibration.*no trainable BatchNorm"):
        train(load_config(None, vit), quiet=True)


def test_brain_study_quick_end_to_end(tmp_path, capsys):
    """`ermoe study --config configs/study_brainage.yaml --quick`: every brain method, the claim-7 report, no
    few-shot probes (a few-shot key is an error), finished runs reused."""
    from ermoe.cli import main
    from ermoe.study.brain import BRAIN_DEFAULT_METHODS

    config = str(Path(__file__).parents[1] / "configs" / "study_brainage.yaml")
    assert main(["study", "--config", config, "--list-methods"]) == 0
    assert capsys.readouterr().out.split() == BRAIN_DEFAULT_METHODS
    assert main(["study", "--config", config, "--fewshot_draws=3", "--list-methods"]) == 1
    assert "few-shot probes are part of the image-classification study" in capsys.readouterr().err
    assert main(["study", "--config", config, "--methods=[plain,vit]", "--list-methods"]) == 1
    assert "unknown brain_age study method 'vit'" in capsys.readouterr().err
    args = ["study", "--config", config, "--quick", "--methods=[plain,dense_ffn,ermoe,switch]",
            f"--out_dir={tmp_path / 'runs'}", f"--report={tmp_path / 'results_brainage.md'}"]
    assert main(args) == 0
    report = (tmp_path / "results_brainage.md").read_text()
    assert "do not edit by hand" in report and "ermoe study --config" in report
    for method in ("plain", "dense_ffn", "ermoe", "switch"):
        assert f"| `{method}` |" in report
    assert "Claim 7:" in report and "0.93 x `plain`" in report and "Is it the routing?" in report
    assert (tmp_path / "figures" / "results_brainage_test_mae_vs_cv.png").stat().st_size > 1000
    metrics = json.loads((tmp_path / "runs" / "ermoe" / "seed0" / "metrics.json").read_text())
    assert "fewshot" not in metrics and metrics["task"] == "brain_age"
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 8


def _regional(router="ermoe", top_k=2, **kwargs):
    from ermoe.models.regional import RegionalSFCN

    torch.manual_seed(0)
    tissue = torch.rand(3, 12, 12, 12) * (torch.rand(3, 12, 12, 12) > 0.5)
    return RegionalSFCN(1, (12, 12, 12), 1, [4, 8], tissue, 1, router, top_k, kwargs or None, [4, 8], 0.0)


def test_regional_expert_inputs_are_masked_and_zscored_in_their_tissue():
    model = _regional()
    x = torch.randn(2, 1, 12, 12, 12, dtype=torch.float64) * 3 + 5
    p = model.tissue[1].double()
    w = p / p.sum()
    mu = (x * w).sum(dim=(2, 3, 4), keepdim=True)
    sd = (((x - mu) ** 2) * w).sum(dim=(2, 3, 4), keepdim=True).sqrt()
    torch.testing.assert_close(model.expert_input(x.float(), 1).double(), p * (x - mu) / sd, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.expert_input(x.float(), 3), x.float())  # the free expert reads the volume
    y = model.expert_input(x.float(), 1).double()
    torch.testing.assert_close((y / p.clamp_min(1e-12) * w).sum(dim=(2, 3, 4)), torch.zeros(2, 1, dtype=torch.float64),
                               atol=1e-4, rtol=0)  # mean 0 inside the tissue


def test_regional_model_runs_only_the_chosen_experts_and_matches_a_dense_reference():
    model = _regional().eval()
    x = torch.randn(5, 1, 12, 12, 12)
    seen = {}
    for e, expert in enumerate(model.experts):
        expert.stages[0].register_forward_hook(lambda m, args, out, e=e: seen.__setitem__(e, args[0].shape[0]))
    with torch.no_grad():
        out = model(x)
    idx, gates = model.routing.last_routing.expert_idx, model.routing.last_routing.gates
    assert {e: int((idx == e).sum()) for e in range(4) if (idx == e).any()} == seen  # no expert ran for nothing
    with torch.no_grad():  # every expert on every volume, then the chosen ones weighted
        feats = torch.stack([exp.forward_features(model.expert_input(x, e)).mean(dim=(2, 3, 4))
                             for e, exp in enumerate(model.experts)], 1)
        want = sum(gates[:, k:k + 1] * feats[torch.arange(5), idx[:, k]] for k in range(2))
    torch.testing.assert_close(out, model.head(want), rtol=1e-5, atol=1e-6)
    dropped = _regional(threshold=0.99).eval()  # ERMoE's cosine threshold drops weak second choices
    with torch.no_grad():
        dropped(x)
    assert (dropped.routing.last_routing.expert_idx[:, 1] == -1).all()
    assert dropped.routing.last_routing.expert_idx[:, 0].ge(0).all()
    with pytest.raises(ValueError, match="sets a capacity"):
        _regional(router="vmoe", top_k=1)
    assert _regional().active_parameters() < sum(p.numel() for p in _regional().parameters())


def test_a_batch_normed_gate_tells_alike_volumes_apart_where_a_layer_normed_one_does_not():
    """Brains look alike: a layer norm leaves their gate tokens one direction (every volume routed alike, as in
    the heterogeneous study's `regional` runs); a batch norm centres them over the volumes (``regional_bn``)."""
    from ermoe.models.regional import RegionalSFCN, regional_sfcn3d

    def cosine(t):
        u = torch.nn.functional.normalize(t.double(), dim=1)
        return float(((u @ u.T).sum() - len(t)) / (len(t) * (len(t) - 1)))

    torch.manual_seed(0)
    x = torch.rand(1, 1, 12, 12, 12) * 2 + 0.05 * torch.randn(8, 1, 12, 12, 12)  # one brain, small differences
    tissue = torch.rand(3, 12, 12, 12)
    tokens = {}
    for norm in ("layer", "batch"):
        torch.manual_seed(1)
        model = RegionalSFCN(1, (12, 12, 12), 1, [4, 8], tissue, 1, "ermoe", 2, None, [4, 8], 0.0, norm).eval()
        model.gate_norm.train()  # a batch norm as in a training step: over these volumes' statistics
        with torch.no_grad():
            tokens[norm] = model.gate_norm(model.gate_net.forward_features(x).mean(dim=(2, 3, 4)))
    assert cosine(tokens["layer"]) > 0.99
    assert cosine(tokens["batch"]) < 0 and tokens["batch"].mean(0).abs().max() < 1e-5  # centred over the volumes
    with pytest.raises(ValueError, match="gate_norm must be 'layer' or 'batch'"):
        regional_sfcn3d(gate_norm="group")
    model.train()  # the batch-normed one: a 1-volume training batch has no batch statistics to centre by
    with pytest.raises(ValueError, match="a training batch needs at least 2 volumes, got 1"):
        model(x[:1])
    model.eval()(x[:1])  # the running statistics serve a single volume at evaluation


def test_tiny_regional_run_reports_volume_routing(tmp_path):
    from ermoe.train import ConfigError, load_config, train

    values = {"task": "brain_age", "out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False,
              "probe_size": 4, "bn_recalibration": 1,
              "data": {"name": "brain_cohort", "cohort_size": 24, "spacing": SPACING, "val_size": 4, "test_size": 4},
              "model": {"name": "regional_sfcn3d", "channels": [4, 8], "gate_channels": [4],
                        "router": "softmax_topk"},
              "optim": {"epochs": 1, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 1}}
    metrics = json.loads((train(load_config(None, values), quiet=True) / "metrics.json").read_text())
    layer = metrics["layers"]["routing"]
    assert sum(layer["tokens_per_expert"]) == 4 * 2 and len(layer["expert_age_tertile_counts"]) == 4
    assert "mi_age_tertile_bits" in layer and "probe_changed" in layer and math.isfinite(metrics["test_mae"])
    with pytest.raises(ConfigError, match="model.spacing is set from the data"):
        load_config(None, {**values, "model": {**values["model"], "spacing": 2.0}})


class FixedRng:
    """A stand-in for numpy's Generator in shift_flip: random() and integers() return the given values."""

    def __init__(self, flip_draw: float, shifts: list[int]) -> None:
        self.flip_draw, self.shifts = flip_draw, shifts

    def random(self) -> float:
        return self.flip_draw

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        assert (low, high, size) == (0, 5, 3)  # shifts 0..4 of a padding of 2, one per axis
        return np.asarray(self.shifts)


def test_shift_and_flip_move_a_voxel_by_hand():
    vol = np.zeros((1, 6, 5, 4), dtype=np.float32)
    vol[0, 1, 2, 3] = 1.0
    # no flip (draw 0.7 >= 0.5); output i reads padded i + s = input i + s - 2, so shifts (0, 4, 2) move the
    # content by 2 - s = (+2, -2, 0): voxel (3, 0, 3)
    out = nifti.shift_flip(vol, 2, True, FixedRng(0.7, [0, 4, 2]))
    assert out.shape == vol.shape and out[0, 3, 0, 3] == 1.0 and out.sum() == 1.0
    # flip (draw 0.2): x 1 -> 6 - 1 - 1 = 4, then shifts (2, 2, 2) move nothing
    out = nifti.shift_flip(vol, 2, True, FixedRng(0.2, [2, 2, 2]))
    assert out[0, 4, 2, 3] == 1.0
    # content shifted out of the volume is gone (zero filled): x 1 moved by 2 - 4 = -2
    assert nifti.shift_flip(vol, 2, False, FixedRng(0.9, [4, 2, 2])).sum() == 0.0


def test_parallel_cache_build_writes_the_serial_files(tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        nib.save(blob_image(centre_mm=(20.0 - 10 * i, 0.0, 0.0), spacing=4.0), tmp_path / f"s{i}.nii.gz")
        paths.append(tmp_path / f"s{i}.nii.gz")
    files = nifti.build_cache(paths, SPACING, workers=2)
    parallel = [np.load(f) for f in files]
    for f in files:
        f.unlink()
    serial = [np.load(f) for f in nifti.build_cache(paths, SPACING, workers=0)]
    assert all(np.array_equal(a, b) for a, b in zip(parallel, serial))
    (tmp_path / "s1.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(BrainDataError, match="s1.nii.gz: not a readable NIfTI"):
        nifti.build_cache(paths, SPACING, workers=2)


def test_volumes_read_from_disk_in_workers_train_as_volumes_held_in_memory(tmp_path):
    """Augmented brain-age training from the cache files in 2 loader workers follows the in-memory curve exactly,
    and a distributed rank's share of each batch is the rows one process reads."""
    from ermoe.data.loader import StepBatchSampler
    from ermoe.train import load_config, train

    def cfg(name: str, **data) -> object:
        return load_config(None, {
            "task": "brain_age", "out_dir": str(tmp_path / "runs"), "run_name": name, "progress": False,
            "tensorboard": False, "probe_size": 4, "log_every": 1,
            "data": {"name": "brain_cohort", "cohort_size": 24, "spacing": SPACING, "val_size": 4, "test_size": 4,
                     "crop_padding": 1, "hflip": True, **data},
            "model": {"name": "sfcn3d", "channels": [4, 8, 8], "moe": {"router": "ermoe", "num_experts": 2}},
            "optim": {"epochs": 1, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 1}})

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    memory = train(cfg("memory"), quiet=True)
    disk = train(cfg("disk", memory_cap_gb=0.0, num_workers=2), quiet=True)
    assert len(losses(memory)) == 2 and losses(memory) == losses(disk)
    m, d = (json.loads((r / "metrics.json").read_text()) for r in (memory, disk))
    assert m["test_mae"] == d["test_mae"]

    from ermoe.train import create_task
    task = create_task(cfg("x", memory_cap_gb=0.0), torch.device("cpu"))
    task.load()
    assert not task.stores["train"].in_memory
    whole = list(task.train_batches(0, 2))
    halves = [list(task.train_batches(0, 2, rank, 2)) for rank in range(2)]
    for step in range(2):
        assert torch.equal(torch.cat([h[step].inputs[0] for h in halves]), whole[step].inputs[0])
    keys = next(iter(StepBatchSampler(task.num_train, 8, task.setup.seed, 1, 2)))
    alone = task.batches.train_batch(torch.tensor([k.index for k in keys]), 1)
    assert torch.equal(alone.inputs[0], whole[1].inputs[0])  # the batch of step 1 alone: the same draws


def test_the_documented_own_data_command_loads(tmp_path, capsys):
    from ermoe.train import load_config

    rows = [{"path": f"s{i}.nii.gz", "age": str(20 + i), "subject": f"p{i}"} for i in range(4)]
    path = write_csv(tmp_path / "ages.csv", rows)
    # docs/brainage.md, "Your own data", with the CSV's path
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "brainage_ermoe.yaml",
                      ["data.name=nifti_csv", f"data.csv={path}", "data.spacing=2", "data.val_size=50",
                       "data.test_size=100"])
    assert (cfg.data.name, cfg.data.spacing, cfg.data.val_size, cfg.data.test_size) == ("nifti_csv", 2.0, 50, 100)
    assert "cohort_size" in capsys.readouterr().err
