"""A corpus of real high-resolution photographs anyone can fetch: Debian's wallpaper packages.

    python -m benchmarks.photo_corpus --out ~/.cache/two-stage-ldm/photo-corpus   # make photo-corpus
    python -m benchmarks.photo_corpus --out DIR --debs FOLDER    # from .deb files already downloaded

`apt-get download` fetches the packages (no root needed, no install), `dpkg-deb -x` unpacks each into a
temporary folder, and one file is kept per image: the largest in pixels, where a wallpaper ships at several
resolutions (plasma's at up to twelve, mate's Elephants at three). Writes

- `DIR/images/<package>/<name>.<ext>`: the kept files, byte for byte as the package ships them;
- `DIR/manifest.json`: per image its file, package, version, pixel size, sha256, the path inside the
  package and its kind (`photo` or `render`, from `KIND` below; renders are smoother than photographs
  and flatter a resampling baseline, so benchmarks can keep them apart);
- `DIR/debs/`: the downloaded packages, so a second build downloads nothing.

Nothing of the images belongs in the repository. Each bad case is one line: no `apt-get` on the machine
(then any folder of photographs serves, through `--photos DIR` of the benchmarks), a package that cannot
be fetched (the others are still used), a file that does not decode (left out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

from PIL import Image

from ldm_core.training.run_folder import write_json

PACKAGES = ("plasma-workspace-wallpapers", "mate-backgrounds", "ukui-wallpapers", "lomiri-wallpapers-20.04")
DEFAULT_OUT = Path("~/.cache/two-stage-ldm/photo-corpus")
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# Which images are photographs of the world and which are digital renders (gradients, vector art, 3D
# scenes, paintings, transparent overlays), judged by eye on the packages' versions in Debian 12. A name in
# neither list is "unlabelled". Keys are `<package>/<name>` as in the manifest.
def _keys(package: str, names: str) -> set[str]:
    return {f"{package}/{name}" for name in names.split()}


PHOTOS = frozenset(
    _keys("plasma-workspace-wallpapers", "BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf "
                                         "Grey Kite OneStandsOut Path summer_1am")
    | _keys("mate-backgrounds", "Aqua Blinds Dune FreshFlower Garden GreenMeadow LadyBird RainDrops Storm "
                                "TwoWings Wood YellowFlower")
    | _keys("lomiri-wallpapers-20.04", "Kleiber_by_Lukas_Baubkus Infinite-Sea_by_Aury88"))
RENDERS = frozenset(
    _keys("plasma-workspace-wallpapers", "Altai Autumn Canopee Cascade Cluster Elarun Flow Flow_dark FlyingKonqui "
                                         "Honeywave IceCold Kay Kay_dark Kokkini MilkyWay Opal PastelHills Patak "
                                         "Patak_dark SafeLanding Shell Volna")
    | _keys("mate-backgrounds", "Arc-Colors-Transparent-Wallpaper Elephants Float-into-MATE Flow GreenTraditional "
                                "Gulp MATE-Stripes-Dark MATE-Stripes-Light Silk Spring Stripes "
                                "Ubuntu-Mate-Cold-no-logo Ubuntu-Mate-Dark-no-logo Ubuntu-Mate-Radioactive-no-logo "
                                "Ubuntu-Mate-Warm-no-logo Waves")
    | _keys("ukui-wallpapers", "2004default calla city desert firstgeneration fluent-color focal-ubuntukylin "
                               "goldfish rhythm rollpaper string the-mouse")
    | _keys("lomiri-wallpapers-20.04", "Fossa_by_Jasper_Roks Painting-Colors_by__herobrine7gamer"))


class CorpusError(RuntimeError):
    """The corpus cannot be built at all; the message says what to do instead."""


def image_name(relative: str) -> Optional[str]:
    """The image a packaged file is a version of, or None for a file that is no wallpaper.

    KDE's layout is `wallpapers/<Name>/contents/images[_dark]/<W>x<H>.<ext>` (the dark variant is another
    image, `<Name>_dark`); its `screenshot.*` is a preview. Elsewhere the name is the file's stem, less a
    trailing `_<W>x<H>` (mate ships `Elephants.jpg`, `Elephants_3840x2160.jpg`, `Elephants_5640x3172.jpg`).
    """
    path = Path(relative)
    if path.suffix.lower() not in SUFFIXES or path.stem.lower() in ("screenshot", "preview", "thumbnail"):
        return None
    parts = path.parts
    if "contents" in parts:
        at = parts.index("contents")
        if at == 0 or at + 1 >= len(parts) - 1 or not parts[at + 1].startswith("images"):
            return None
        variant = parts[at + 1][len("images"):]  # "" or "_dark"
        return parts[at - 1] + variant
    return re.sub(r"_\d+x\d+$", "", path.stem)


def kind_of(key: str) -> str:
    return "photo" if key in PHOTOS else "render" if key in RENDERS else "unlabelled"


def fetch_packages(packages: Sequence[str], debs: Path) -> dict[str, Path]:
    """`apt-get download` each package into `debs` (kept: a second build reuses them); one line per failure."""
    debs.mkdir(parents=True, exist_ok=True)
    found = {name: path for name in packages for path in [_deb_of(debs, name)] if path is not None}
    missing = [name for name in packages if name not in found]
    if missing and shutil.which("apt-get") is None:
        raise CorpusError("apt-get is not on this machine, so Debian's wallpaper packages cannot be fetched; "
                          "put .deb files in a folder and pass --debs FOLDER, or train on any folder of "
                          "photographs with --photos DIR.")
    for name in missing:
        # apt-get writes into the current folder; stderr holds its reason when a package is unknown.
        result = subprocess.run(["apt-get", "download", name], cwd=debs, capture_output=True, text=True)
        path = _deb_of(debs, name)
        if result.returncode != 0 or path is None:
            reason = (result.stderr.strip().splitlines() or ["no reason given"])[-1]
            print(f"could not fetch package {name}: {reason} (run `apt-get update` once if the package lists "
                  f"are old)", file=sys.stderr)
            continue
        found[name] = path
    return found


def _deb_of(folder: Path, package: str) -> Optional[Path]:
    matches = sorted(folder.glob(f"{package}_*.deb"))
    return matches[-1] if matches else None


def _deb_field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def unpack_images(deb: Path, workdir: Path) -> tuple[str, str, dict[str, tuple[Path, str, int, int]]]:
    """Unpack one package; returns (package, version, {name: (file, path in package, width, height)}) with
    the largest version of each image. Files that do not decode are left out with one line each."""
    try:
        package, version = _deb_field(deb, "Package"), _deb_field(deb, "Version")
        target = workdir / package
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        reason = getattr(err, "stderr", None) or str(err)
        raise CorpusError(f"{deb} is not a Debian package dpkg-deb can unpack: {reason.strip()}") from None
    best: dict[str, tuple[Path, str, int, int]] = {}
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        relative = path.relative_to(target).as_posix()
        name = image_name(relative)
        if name is None:
            continue
        try:
            with Image.open(path) as image:
                width, height = image.size
                image.convert("RGB").load()  # the whole file decodes, not only its header
        except Exception as err:  # noqa: BLE001 - any decoder error means the file is left out
            print(f"skipped {package}:{relative}: cannot be decoded ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        if name not in best or width * height > best[name][2] * best[name][3]:
            best[name] = (path, relative, width, height)
    return package, version, best


def build_corpus(out: Path, packages: Sequence[str] = PACKAGES, debs: Optional[Path] = None) -> list[dict]:
    """Fetch (or reuse) the packages, keep the largest file of each image, write `out/manifest.json`."""
    out = Path(out).expanduser()
    debs = Path(debs).expanduser() if debs is not None else out / "debs"
    files = fetch_packages(packages, debs) if debs == out / "debs" else _local_debs(debs, packages)
    if not files:
        raise CorpusError(f"none of the packages {', '.join(packages)} could be fetched; see the lines above, "
                          f"or train on any folder of photographs with --photos DIR.")
    # Filled beside the corpus and swapped in at the end, so a build that fails keeps the last corpus whole.
    images_root = out / ".images-partial"
    shutil.rmtree(images_root, ignore_errors=True)
    manifest, seen = [], {}
    with tempfile.TemporaryDirectory(prefix="photo-corpus-", dir=out if out.exists() else None) as work:
        for name in packages:
            if name not in files:
                continue
            package, version, best = unpack_images(files[name], Path(work))
            folder = images_root / package
            folder.mkdir(parents=True, exist_ok=True)
            for image, (path, relative, width, height) in sorted(best.items()):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                if digest in seen:  # the same bytes in two packages: kept once
                    print(f"skipped {package}:{relative}: same file as {seen[digest]}", file=sys.stderr)
                    continue
                kept = folder / f"{image}{path.suffix.lower()}"
                shutil.copyfile(path, kept)
                seen[digest] = f"images/{kept.relative_to(images_root).as_posix()}"
                manifest.append({"file": seen[digest], "package": package, "version": version,
                                 "width": width, "height": height, "sha256": digest,
                                 "source": "/" + relative, "kind": kind_of(f"{package}/{image}")})
            shutil.rmtree(Path(work) / package)  # unpacked packages are large; keep only the chosen files
    shutil.rmtree(out / "images", ignore_errors=True)
    images_root.rename(out / "images")
    write_json(out / "manifest.json", {"packages": {n: str(files[n].name) for n in packages if n in files},
                                       "images": manifest})
    return manifest


def _local_debs(folder: Path, packages: Sequence[str]) -> dict[str, Path]:
    if not folder.is_dir():
        raise CorpusError(f"--debs {folder} is not a folder of .deb files.")
    found = {}
    for name in packages:
        path = _deb_of(folder, name)
        if path is None:
            print(f"could not fetch package {name}: no {name}_*.deb in {folder}", file=sys.stderr)
        else:
            found[name] = path
    return found


def load_manifest(out: Path) -> list[dict]:
    """The manifest of a built corpus; raises CorpusError when there is none."""
    path = Path(out).expanduser() / "manifest.json"
    if not path.is_file():
        raise CorpusError(f"{path} does not exist; build the corpus with `python -m benchmarks.photo_corpus "
                          f"--out {out}`.")
    return json.loads(path.read_text())["images"]


def summary_table(manifest: Iterable[dict]) -> str:
    rows = list(manifest)
    lines = ["| kind | images | smallest (px) | largest (px) |", "|---|---|---|---|"]
    for kind in ("photo", "render", "unlabelled"):
        chosen = [r for r in rows if r["kind"] == kind]
        if chosen:
            small = min(chosen, key=lambda r: r["width"] * r["height"])
            large = max(chosen, key=lambda r: r["width"] * r["height"])
            lines.append(f"| {kind} | {len(chosen)} | {small['width']}x{small['height']} | "
                         f"{large['width']}x{large['height']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="corpus folder (default: %(default)s)")
    parser.add_argument("--debs", type=Path, default=None,
                        help="a folder of already downloaded .deb files to use instead of apt-get")
    parser.add_argument("--packages", default=",".join(PACKAGES), help="comma-separated (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        manifest = build_corpus(args.out, tuple(p for p in args.packages.split(",") if p), args.debs)
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(manifest)} images in {args.out.expanduser() / 'images'} (manifest.json beside it)")
    print(summary_table(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
