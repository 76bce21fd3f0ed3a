"""Write the colour photographs bundled with scikit-image to a folder, for `ldm bench-recon --data`.

These few photographs ship inside the scikit-image package (no download), so a reconstruction
benchmark on real images can be reproduced on an offline machine:

    python -m benchmarks.export_skimage_photos runs/photos
    ldm bench-recon --vae RUN/vae --data runs/photos --resolution 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from benchmarks.photo_test_set import load_photo

# Colour photographs stored inside the package itself (others are fetched on first use).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")


def export(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PHOTOS:
        try:
            image = load_photo(name)
        except Exception as err:  # noqa: BLE001 - a photo that would need a download is simply left out
            print(f"skipped {name}: {err}", file=sys.stderr)
            continue
        path = folder / f"{name}.png"
        Image.fromarray(image).save(path)
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=Path("runs/photos"), help="folder to write into")
    args = parser.parse_args(argv)
    paths = export(args.out)
    print(f"{len(paths)} photographs written to {args.out}")


if __name__ == "__main__":
    main()
