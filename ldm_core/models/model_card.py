"""Model cards: the `README.md` every saved autoencoder and pipeline folder carries, in the Hub's format.

A card is the Hub's metadata header (YAML between `---` lines: library, pipeline tag, tags, datasets,
base model), then what the model is, how to load it, what it was trained on and how long, the figures the
run measured, its picture (copied into the folder beside the card, so the card shows it locally and on the
Hub) and the resolved config. `huggingface_hub.ModelCard` writes the header, so the card parses as any Hub
card does; `ldm push` uploads the folder with it (workflows/push.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

CARD_FILE = "README.md"


@dataclass
class CardContent:
    """What a model card says.

    Parameters:
        title: the heading.
        summary: one paragraph: what the model is.
        usage: a Python snippet that loads it (shown as code).
        training: (label, value) rows: data, steps, batch, learning rate, time.
        figures: (label, value) rows: what the run measured.
        config_yaml: the run's resolved config (its config.yaml).
        picture: an image to copy beside the card and show (a sample grid, reconstructions).
        picture_name: its file name in the folder (default: its own).
        picture_caption: what the picture shows.
        pipeline_tag, tags, datasets, base_model: the Hub's metadata fields.
    """

    title: str
    summary: str
    usage: str
    training: list[tuple[str, Any]]
    figures: list[tuple[str, Any]]
    config_yaml: str = ""
    picture: Optional[Path] = None
    picture_name: str = ""
    picture_caption: str = ""
    pipeline_tag: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    base_model: Optional[str] = None


def write_model_card(folder: str | Path, content: CardContent) -> Path:
    """Write `folder/README.md` (and the picture beside it); returns the card's path."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    metadata = ModelCardData(library_name="diffusers", pipeline_tag=content.pipeline_tag,
                             tags=["two-stage-ldm", *content.tags], datasets=content.datasets or None,
                             base_model=content.base_model)
    lines = [f"# {content.title}", "", content.summary, ""]
    if content.picture is not None and Path(content.picture).is_file():
        name = content.picture_name or Path(content.picture).name
        shutil.copyfile(content.picture, folder / name)
        lines += [f"![{name}]({name})", ""] + ([f"*{content.picture_caption}*", ""] if content.picture_caption else [])
    lines += ["## Use", "", "```python", content.usage.strip(), "```", ""]
    lines += ["## Training", "", *_table(content.training), ""]
    lines += ["## Measured", "", *_table(content.figures), ""]
    if content.config_yaml:
        lines += ["## Config", "", "The run's resolved config (`config.yaml`):", "", "```yaml",
                  content.config_yaml.strip(), "```", ""]
    lines += ["Trained with two-stage-ldm (`ldm train-vae`, `ldm train-unet`)."]
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    path = folder / CARD_FILE
    card.save(path)
    return path


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    return ["| | |", "|---|---|", *(f"| {label} | {_cell(value)} |" for label, value in rows)]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")

