"""Write the colour photographs bundled with scikit-image to a folder, for `ldm bench-recon --data`.

These few photographs ship inside the scikit-image package (no download), so a reconstruction
benchmark on real images can be reproduced on an offline machine:

    python -m benchmarks.export_skimage_photos runs/photos
    ldm bench-recon --vae RUN/vae --data runs/photos --resolution 256
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Colour photographs stored inside the package itself (others are fetched on first use).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def export(folder: Path) -> list[Path]:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PHOTOS:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception as err:  # noqa: BLE001 - a photo that would need a download is simply left out
            print(f"skipped {name}: {err}", file=sys.stderr)
            continue
        path = folder / f"{name}.png"
        Image.fromarray(image[..., :3]).save(path)
        written.append(path)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/photos")
    paths = export(out)
    print(f"{len(paths)} photographs written to {out}")
