"`fundus-lab bench data --scale` at tiny sizes, and the one-decode check and cache pass in worker processes."
import math
from pathlib import Path

import cv2
import pytest

from fundus_lab import cache
from fundus_lab.cache import check_and_cache, process_map
from fundus_lab.cli import main
from fundus_lab.synth import synth_fundus

COLUMNS = ["photos", "check+cache", "s", "check+cache", "s/photo", "epoch", "s", "epoch", "s/photo"]


def test_bench_scale_prints_one_row_per_size_and_removes_its_folder(capsys):
    argv = ["bench", "data", "--scale", "--scale-sizes", "8", "16", "--size", "64", "--n-images", "4", "--photo-size", "300x200"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["photos"])
    assert lines[header].split() == COLUMNS
    assert "epoch: read cached square + training augmentation in 2 threads, no model" in lines[header - 1]
    rows = [line.split() for line in lines[header + 1:header + 3]]
    assert [int(r[0]) for r in rows] == [8, 16]
    for r in rows:
        photos, check_s, check_per_photo, epoch_s, epoch_per_photo = int(r[0]), *map(float, r[1:])
        assert check_s > 0 and epoch_s > 0
        assert math.isclose(check_per_photo, check_s / photos, rel_tol=0.1, abs_tol=1e-3)
        assert math.isclose(epoch_per_photo, epoch_s / photos, rel_tol=0.1, abs_tol=1e-3)
    assert lines[0].startswith("Working in ") and lines[-1].startswith("Temporary folder ")
    assert not Path(lines[-1].removeprefix("Temporary folder ").removesuffix(" removed.")).exists()


def test_bench_scale_refuses_sizes_the_disk_cannot_hold(capsys):
    argv = ["bench", "data", "--scale", "--scale-sizes", "10000000000", "--n-images", "1", "--photo-size", "150x100"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--scale-sizes" in err and "GiB" in err


@pytest.fixture
def photos(tmp_path) -> list[str]:
    "Six generated 240-pixel JPEGs and one truncated copy."
    paths = []
    for seed in range(6):
        paths.append(str(tmp_path/f"eye{seed}.jpg"))
        cv2.imwrite(paths[-1], synth_fundus(seed, 240)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    broken = tmp_path/"broken.jpg"
    broken.write_bytes(Path(paths[0]).read_bytes()[:400])
    return paths + [str(broken)]


def test_worker_processes_give_the_results_and_files_of_one_process(photos, tmp_path, recwarn):
    alone = check_and_cache(photos, 48, tmp_path/"alone", size=48, workers=1)
    pooled = check_and_cache(photos, 48, tmp_path/"pooled", size=48, workers=2)
    assert not [w for w in recwarn if "worker processes" in str(w.message)]
    assert pooled == alone and "broken.jpg is truncated" in alone[-1][0]
    files = lambda name: sorted((tmp_path/name/"images").iterdir())
    assert [f.name for f in files("pooled")] == [f.name for f in files("alone")] and len(files("alone")) == 6
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(files("alone"), files("pooled")))


def test_one_process_when_worker_processes_cannot_start(monkeypatch):
    def no_processes(*args, **kwargs): raise OSError("process limit reached")
    monkeypatch.setattr(cache, "ProcessPoolExecutor", no_processes)
    with pytest.warns(UserWarning, match="Could not run 2 worker processes .*process limit reached.*this process only"):
        assert process_map(math.factorial, [3, 4, 5], workers=2) == [6, 24, 120]
