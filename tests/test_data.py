"""Dataset loaders on the shipped data: shapes, counts, determinism, and one-line DataErrors."""
import gzip
import hashlib
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mpipar.app.datasets import (CIFAR10_CLASSES, Split, anomaly_windows, load_appliances, load_basicmotions,
                         load_cifar10, load_cora, load_ecg_beats, load_qm9, load_temperature_stream,
                         load_wisdm, mean_baseline_mae, persistence_rmse, read_image_folder,
                         read_python_batch, regression, split_normal_train, split_qm9, windows)
from mpipar.app.places import examples_dir
from mpipar.errors import DataError

VENDORED = examples_dir() / "data"

torch.set_num_threads(1)
FIRST200 = VENDORED / "cifar10" / "cifar-10-batches-py-first200"


def one_line_error(fn, path, *args, **kw):
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def copy_of(name, tmp_path) -> Path:
    dst = tmp_path / name
    shutil.copytree(VENDORED / name, dst)
    return dst


def test_shipped_files_match_readme():
    text = (VENDORED / "README.md").read_text()
    listed = dict(reversed(m) for m in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, flags=re.M))
    shipped = {str(p.relative_to(VENDORED)) for p in VENDORED.rglob("*")
               if p.is_file() and p.suffix not in (".py", ".md") and "__pycache__" not in p.parts}
    assert set(listed) == shipped
    for rel, digest in listed.items():
        assert hashlib.sha256((VENDORED / rel).read_bytes()).hexdigest() == digest, rel
    assert sum((VENDORED / r).stat().st_size for r in shipped) < 25e6
    a, b = Split(torch.zeros(2), torch.zeros(2), "a"), Split(torch.zeros(3), torch.zeros(3), "b")
    a.meta["k"] = 1
    assert b.meta == {} and len(b) == 3  # meta defaults are not shared


def test_cifar10_shipped():
    tr, te = load_cifar10()
    assert tr.x.shape == (8000, 3, 32, 32) and te.x.shape == (2000, 3, 32, 32)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert torch.bincount(tr.y).tolist() == [800] * 10 and torch.bincount(te.y).tolist() == [200] * 10
    assert abs(float(tr.x.mean())) < 0.1 and 0.8 < float(tr.x.std()) < 1.2
    assert "8000" in tr.note and "JPEG" in tr.note and len(CIFAR10_CLASSES) == 10
    small_tr, small_te = load_cifar10(n_train=50, n_test=20)
    assert torch.equal(small_tr.x, tr.x[:50]) and torch.equal(small_te.y, te.y[:20])
    assert torch.bincount(small_tr.y, minlength=10).tolist() == [5] * 10


def test_cifar10_python_batch_first200():
    x, y = read_python_batch(FIRST200 / "data_batch_1_first200")
    assert x.shape == (200, 3, 32, 32) and x.dtype == np.uint8
    assert y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    tr, te = load_cifar10(FIRST200)
    assert len(tr) + len(te) == 200 and tr.x.shape[1:] == (3, 32, 32)


def test_cifar10_official_layout_and_image_folder(tmp_path):
    from PIL import Image
    x, y = read_python_batch(FIRST200 / "data_batch_1_first200")
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, n in enumerate(names):
        sl = slice(30 * i, 30 * i + 30)
        with open(d / n, "wb") as f:
            pickle.dump({b"data": x[sl].reshape(30, -1), b"labels": y[sl].tolist()}, f)
    tr, te = load_cifar10(tmp_path, n_test=10)  # parent folder works too
    assert len(tr) == 150 and len(te) == 10 and torch.equal(te.y, torch.from_numpy(y[150:160]))
    img = tmp_path / "imgs"
    for i in range(20):
        (img / CIFAR10_CLASSES[y[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].transpose(1, 2, 0)).save(img / CIFAR10_CLASSES[y[i]] / f"{i:04d}.png")
    xi, yi, ni = read_image_folder(img)
    order = [int(n.split("/")[1][:4]) for n in ni]
    assert np.array_equal(xi, x[order]) and np.array_equal(yi, y[order])  # PNG is lossless
    tr, te = load_cifar10(img)
    assert len(tr) + len(te) == 20


def test_cifar10_errors(tmp_path):
    msg = one_line_error(load_cifar10, tmp_path / "nope", tmp_path / "nope")
    assert "data_batch_1..5" in msg and "--data-dir" in msg
    one_line_error(load_cifar10, tmp_path, tmp_path)  # exists but empty
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
    one_line_error(read_python_batch, tmp_path / "data_batch_1", tmp_path / "data_batch_1")
    (tmp_path / "data_batch_1").unlink()
    (tmp_path / "cifar10_test_jpeg.npz").write_bytes(b"PK garbage")
    one_line_error(load_cifar10, tmp_path, tmp_path)


def test_synthetic_regression():
    tr, te = regression()
    assert tr.x.shape == (2048, 12) and te.y.shape == (512, 12) and tr.x.dtype == torch.float32
    tr2, _ = regression()
    assert torch.equal(tr.x, tr2.x) and torch.equal(tr.y, tr2.y)
    assert not torch.equal(regression(seed=1)[0].y, tr.y)
    x1 = torch.cat([tr.x, torch.ones(len(tr), 1)], 1)
    w = torch.linalg.lstsq(x1, tr.y).solution
    linear_mse = float(((x1 @ w - tr.y) ** 2).mean())
    assert 0.1 < linear_mse < 0.9  # partly linear, clearly nonlinear, far above the 0.0025 noise floor
    assert regression(10, 5, in_dim=3, out_dim=2)[1].y.shape == (5, 2)


def test_appliances():
    tr, te = load_appliances()
    assert tr.x.shape == (15764, 24, 26) and te.x.shape == (3947, 24, 26) and tr.y.shape == (15764, 1)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.float32
    assert tr.meta["target_index"].max() < te.meta["target_index"].min()
    assert abs(float(tr.y.mean())) < 0.05 and 90 < tr.meta["y_std"] < 120
    assert 40 < persistence_rmse(te) < 100
    tr6, te6 = load_appliances(window=6, horizon=3)
    assert tr6.x.shape[1:] == (6, 26) and len(tr6) + len(te6) == 19735 - 6 - 3 + 1
    assert torch.equal(load_appliances(window=6, horizon=3)[1].x, te6.x)


def test_appliances_errors(tmp_path):
    one_line_error(load_appliances, tmp_path / "energydata_complete.csv.gz", tmp_path)
    (tmp_path / "energydata_complete.csv.gz").write_bytes(b"not gzip")
    one_line_error(load_appliances, tmp_path, tmp_path)
    (tmp_path / "energydata_complete.csv.gz").write_bytes(gzip.compress(b"date,Appliances\nx,y\n"))
    one_line_error(load_appliances, tmp_path, tmp_path)


def test_cora(tmp_path):
    data = load_cora()
    assert data.num_nodes == 2708 and data.x.shape == (2708, 1433) and data.edge_index.shape == (2, 10556)
    assert [int(m.sum()) for m in (data.train_mask, data.val_mask, data.test_mask)] == [140, 500, 1000]
    assert int(data.y.max()) == 6
    d = copy_of("cora", tmp_path)
    (d / "ind.cora.graph").write_bytes(b"garbage")
    one_line_error(load_cora, d, d)
    marker = tmp_path / "payload-ran"                 # a pickle payload: refused before it runs
    (d / "ind.cora.graph").write_bytes(pickle.dumps(Payload(marker)))
    assert "pathlib.Path.touch" in one_line_error(load_cora, d, d) and not marker.exists()
    (d / "ind.cora.graph").unlink()
    assert "ind.cora.graph" in one_line_error(load_cora, d, d)


def test_ecg(tmp_path):
    beats = load_ecg_beats()
    assert beats.x.shape == (2271, 200) and beats.x.dtype == torch.float32 and beats.y.dtype == torch.int64
    assert int(beats.y.sum()) == 34 and set(beats.y.tolist()) == {0, 1}
    assert beats.x.std(1, correction=0).mean().item() == pytest.approx(1.0, abs=1e-3)
    tr, te = split_normal_train(beats)
    assert int(tr.y.sum()) == 0 and int(te.y.sum()) == 34 and len(tr) + len(te) == 2271
    assert not set(tr.meta["index"].tolist()) & set(te.meta["index"].tolist())
    assert torch.equal(split_normal_train(beats)[1].meta["index"], te.meta["index"])
    assert load_ecg_beats(window=(10, 20)).x.shape[1] == 30
    one_line_error(load_ecg_beats, tmp_path / "100.hea", tmp_path)
    msg = one_line_error(load_ecg_beats, VENDORED / "ecg" / "208.hea", record="208")   # any record, by name
    assert "MIT-BIH record 208 (208.hea, 208.dat and 208.atr)" in msg
    d = copy_of("ecg", tmp_path)
    hea = (d / "100.hea").read_text()   # the same record under another name
    (d / "x1.hea").write_text(hea.replace("\n100 ", "\nx1 ").replace("100.dat", "x1.dat"))
    (d / "100.dat").rename(d / "x1.dat")
    (d / "100.atr").rename(d / "x1.atr")
    assert torch.equal(load_ecg_beats(d, record="x1").x, beats.x)
    d = copy_of("ecg", tmp_path / "again")
    (d / "100.hea").write_text("this is not a header\n")
    one_line_error(load_ecg_beats, d, d)


def test_basicmotions_and_wisdm(tmp_path):
    tr, te = load_basicmotions()
    assert tr.x.shape == (40, 6, 100) and te.x.shape == (40, 6, 100) and tr.x.dtype == torch.float32
    assert torch.bincount(tr.y).tolist() == [10] * 4 and tr.meta["classes"][0] == "Standing"
    one_line_error(load_basicmotions, tmp_path / "BasicMotions_TRAIN.ts", tmp_path)
    d = copy_of("accelerometer", tmp_path)
    (d / "basicmotions" / "BasicMotions_TRAIN.ts").write_text("@classLabel true A B\n@data\n1,2:3,oops:A\n")
    one_line_error(load_basicmotions, d, d)
    tr, te = load_wisdm()
    assert len(tr) + len(te) == 5418 and tr.x.shape[1] == 43 and tr.x.dtype == torch.float32
    assert not torch.isnan(tr.x).any() and not torch.isnan(te.x).any()
    assert not set(tr.meta["users"].tolist()) & set(te.meta["users"].tolist())
    assert int(tr.y.max()) == int(te.y.max()) == 5
    assert abs(float(tr.x.mean())) < 0.05
    assert torch.equal(load_wisdm()[1].x, te.x)
    one_line_error(load_wisdm, tmp_path / "WISDM_ar_v1.1_transformed.arff", tmp_path)
    (d / "wisdm" / "WISDM_ar_v1.1_transformed.arff").write_text("@relation x\n@attribute a numeric\n")
    one_line_error(load_wisdm, d, d)


def test_temperature(tmp_path):
    for series, n, k in [("ambient_temperature_system_failure", 7267, 2),
                         ("machine_temperature_system_failure", 22695, 4)]:
        ts, v = load_temperature_stream(series=series)
        assert ts.dtype == torch.int64 and v.dtype == torch.float32 and len(ts) == len(v) == n
        assert bool((ts[1:] >= ts[:-1]).all())
        assert anomaly_windows(series=series).shape == (k, 2)
    tr, te = windows(v, 48, horizon=2)
    assert tr.x.shape[1:] == (48, 1) and tr.y.shape[1] == 1 and len(tr) + len(te) == n - 48 - 2 + 1
    assert te.meta["target_index"].min() == int(n * 0.8)
    assert abs(float(tr.y.mean())) < 0.1
    one_line_error(load_temperature_stream, tmp_path / "ambient_temperature_system_failure.csv", tmp_path)
    (tmp_path / "ambient_temperature_system_failure.csv").write_text("timestamp,value\nyesterday,hot\n")
    one_line_error(load_temperature_stream, tmp_path, tmp_path)


def test_qm9(tmp_path):
    graphs = load_qm9()
    assert len(graphs) == 4000 and graphs[0].mol_id == "gdb_7"
    g = graphs[0]  # ethane: 2 C, 6 H, 7 bonds
    assert g.x.shape == (8, 6) and g.pos.shape == (8, 3) and g.edge_index.shape == (2, 14)
    assert g.y.shape == (1, 1) and g.x.dtype == torch.float32
    for g in graphs[::50]:
        assert torch.equal(g.x[:, :5].sum(1), torch.ones(g.num_nodes))
        deg = torch.bincount(g.edge_index[0], minlength=g.num_nodes)
        assert bool((deg[g.z == 1] == 1).all())  # every hydrogen has exactly one bond
    tr, te = split_qm9(graphs)
    assert len(tr) == 3200 and len(te) == 800 and 0.5 < mean_baseline_mae(tr, te) < 2.0
    few = load_qm9(max_molecules=5)
    assert [g.mol_id for g in few] == [g.mol_id for g in graphs[:5]]
    assert torch.equal(few[3].edge_index, graphs[3].edge_index)
    one_line_error(load_qm9, tmp_path / "nope", tmp_path / "nope")
    d = copy_of("qm9", tmp_path)
    (d / "qm9_subset_geometries.xyz.gz").write_bytes(gzip.compress(b"3\ngdb_1\nC 0 0 0\n"))
    one_line_error(load_qm9, d, d)


class Payload:
    """A pickle that, if unpickled by plain pickle.load, creates the file `marker` (code ran)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cifar10_pickle_payload_runs_no_code(tmp_path):
    """A data_batch_1 that is a pickle payload is refused before any of its code runs; the
    official format (numpy arrays, lists, bytes, dicts) at every pickle protocol still loads."""
    marker = tmp_path / "payload-ran"
    d = tmp_path / "data"
    d.mkdir()
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}))
    with pytest.raises(DataError) as e:
        load_cifar10(d)
    assert not marker.exists(), "the payload's code ran"
    assert str(d / "data_batch_1") in str(e.value) and "pathlib.Path.touch" in str(e.value), e.value
    x, y = read_python_batch(FIRST200 / "data_batch_1_first200")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        f = d / f"data_batch_p{protocol}"
        f.write_bytes(pickle.dumps({b"batch_label": b"b", b"data": x.reshape(200, -1), b"labels": y.tolist(),
                                    b"filenames": [b"a.png"] * 200}, protocol=protocol))
        got_x, got_y = read_python_batch(f)
        assert np.array_equal(got_x, x) and np.array_equal(got_y, y), protocol
