"""The photo corpus builder on a small Debian package made here: which file of an image it keeps, the
manifest, and one clear line for each bad case (no apt-get, a package that cannot be fetched, a file that
does not decode)."""

import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from benchmarks import photo_corpus as C

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")


def _image(path, width, height, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _deb(tmp_path, package="fake-wallpapers", version="1.2-3"):
    root = tmp_path / "pkgroot" / package
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: tests <t@example.org>\n"
        f"Description: wallpapers for a test\n")
    kde = root / "usr/share/wallpapers/Lake/contents"
    _image(kde / "images/64x40.png", 64, 40, seed=1)
    _image(kde / "images/160x100.png", 160, 100, seed=2)  # the largest of Lake: kept
    _image(kde / "images_dark/96x60.png", 96, 60, seed=3)  # another image: Lake_dark
    _image(kde / "screenshot.png", 32, 20, seed=4)  # a preview, not a wallpaper
    other = root / "usr/share/backgrounds"
    _image(other / "Dune.jpg", 80, 50, seed=5)
    _image(other / "Dune_200x120.jpg", 200, 120, seed=6)  # the largest of Dune: kept
    (other / "Broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    debs = tmp_path / "debs"
    debs.mkdir(exist_ok=True)
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(debs / f"{package}_{version}_all.deb")],
                   check=True, capture_output=True)
    return debs


def test_keeps_the_largest_file_of_each_image_and_writes_a_manifest(tmp_path, capsys):
    debs = _deb(tmp_path)
    out = tmp_path / "corpus"
    manifest = C.build_corpus(out, packages=("fake-wallpapers",), debs=debs)
    by_file = {row["file"]: row for row in manifest}
    assert set(by_file) == {"images/fake-wallpapers/Lake.png", "images/fake-wallpapers/Lake_dark.png",
                            "images/fake-wallpapers/Dune.jpg"}
    assert (by_file["images/fake-wallpapers/Lake.png"]["width"], by_file["images/fake-wallpapers/Lake.png"]["height"]) == (160, 100)
    assert by_file["images/fake-wallpapers/Dune.jpg"]["source"] == "/usr/share/backgrounds/Dune_200x120.jpg"
    for row in manifest:
        assert row["package"] == "fake-wallpapers" and row["version"] == "1.2-3" and row["kind"] == "unlabelled"
        assert hashlib.sha256((out / row["file"]).read_bytes()).hexdigest() == row["sha256"]
        with Image.open(out / row["file"]) as image:
            assert image.size == (row["width"], row["height"])
    assert json.loads((out / "manifest.json").read_text())["images"] == manifest
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Broken.png" in err[0] and "cannot be decoded" in err[0]
    assert not any(p.name.startswith("photo-corpus-") for p in out.iterdir())  # the unpacked package is gone


def test_image_names_group_resolutions_and_skip_previews():
    assert C.image_name("usr/share/wallpapers/Path/contents/images/5120x2880.jpg") == "Path"
    assert C.image_name("usr/share/wallpapers/Flow/contents/images_dark/720x1440.jpg") == "Flow_dark"
    assert C.image_name("usr/share/wallpapers/Path/contents/screenshot.jpg") is None
    assert C.image_name("usr/share/backgrounds/mate/abstract/Elephants_5640x3172.jpg") == "Elephants"
    assert C.image_name("usr/share/backgrounds/mate/abstract/Elephants.jpg") == "Elephants"
    assert C.image_name("usr/share/doc/wallpapers/copyright") is None
    assert C.kind_of("mate-backgrounds/LadyBird") == "photo" and C.kind_of("ukui-wallpapers/calla") == "render"


def test_without_apt_get_one_line_names_the_way_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert C.main(["--out", str(tmp_path / "corpus"), "--packages", "fake-wallpapers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get is not on this machine" in err[0] and "--photos DIR" in err[0]


def test_a_package_that_cannot_be_fetched_is_one_line_and_the_others_are_used(tmp_path, monkeypatch, capsys):
    debs = _deb(tmp_path)
    out = tmp_path / "corpus"
    (out / "debs").mkdir(parents=True)
    shutil.copy(next(debs.glob("*.deb")), out / "debs")  # already downloaded: reused, not fetched again
    # An apt-get that knows no package, as on a machine whose package lists lack it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho \"E: Unable to locate package $2\" >&2\nexit 100\n")
    os.chmod(bin_dir / "apt-get", 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    manifest = C.build_corpus(out, packages=("fake-wallpapers", "no-such-wallpapers"))
    assert {row["package"] for row in manifest} == {"fake-wallpapers"}
    lines = [line for line in capsys.readouterr().err.splitlines() if "no-such-wallpapers" in line]
    assert len(lines) == 1 and "could not fetch package no-such-wallpapers" in lines[0]
    assert "Unable to locate package no-such-wallpapers" in lines[0]


def test_no_package_at_all_is_an_error_that_says_what_to_do(tmp_path, capsys):
    (tmp_path / "debs").mkdir()
    with pytest.raises(C.CorpusError, match="--photos DIR"):
        C.build_corpus(tmp_path / "corpus", packages=("fake-wallpapers",), debs=tmp_path / "debs")
