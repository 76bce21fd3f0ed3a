"""Drawing images from a trained model: the default number of steps, and the checks of the settings a user
gives (steps, guidance, eta, class labels) against what the model is.

Defined once here, below everything that takes these settings: the configs' `sampling:` and `evaluation:`
sections, the pipeline's `__call__`, and `ldm generate`, which checks them against a saved model's files
before it loads the model. Each check raises ValueError naming the setting the way its caller spells it
(`names`, `option`): a Python keyword, a command-line flag or a config key.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

# DPM-Solver++(2M), the sampler a Stage B run saves with its pipeline unless told otherwise, gives good samples
# in 15 to 20 steps (Lu et al. 2022, "DPM-Solver++", abstract). The default of `ldm generate --steps`, of the
# configs' sampling.num_inference_steps and evaluation.num_inference_steps, and of the pipeline's __call__.
DEFAULT_SAMPLING_STEPS = 20

_KEYWORDS = {"num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale", "eta": "eta"}


def check_sampling_arguments(*, num_inference_steps, guidance_scale=1.0, eta=0.0,
                             num_train_timesteps: Optional[int] = None, conditional: Optional[bool] = None,
                             names: Optional[dict] = None) -> None:
    """Refuse sampling settings that would fail, or give NaN images, only once sampling has started.

    Parameters:
        num_inference_steps: 1 .. `num_train_timesteps` (diffusers' DDPM and DDIM schedulers raise past the
            training steps; the other samplers repeat timesteps there).
        guidance_scale: finite and >= 0 (0 is the unconditional model, 1 the plain conditional one); a value
            other than 1 needs a class-conditional U-Net (`conditional`, when known).
        eta: DDIM's eta (Song et al. 2021) in [0, 1]: above 1 the DDIM variance exceeds 1 - alpha_{t-1} and
            the step takes the square root of a negative number.
        names: how to call each setting in messages (e.g. {"num_inference_steps": "--steps"}); a config also
            names what sets the bounds: "num_train_timesteps" (e.g. "diffusion.num_train_timesteps") and
            "conditional" (e.g. "stage_b.model.num_classes > 0").

    Raises ValueError naming the setting and its allowed range.
    """
    label = {**_KEYWORDS, **(names or {})}
    steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"{label['num_inference_steps']} must be a whole number of at least 1, got {steps!r}.")
    if num_train_timesteps is not None and steps > num_train_timesteps:
        source = f" ({label['num_train_timesteps']})" if "num_train_timesteps" in label else ""
        raise ValueError(f"{label['num_inference_steps']}={steps} is more than the {num_train_timesteps} steps the "
                         f"model was trained with{source}; use 1..{num_train_timesteps} (15-50 is usual).")
    for key, value, upper in (("guidance_scale", guidance_scale, None), ("eta", eta, 1.0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0 \
                or (upper is not None and value > upper):
            allowed = "a number from 0 to 1" if upper is not None else "a finite number >= 0 (1 = no guidance)"
            raise ValueError(f"{label[key]} must be {allowed}, got {value!r}.")
    if conditional is False and guidance_scale != 1.0:
        needs = f" (guidance needs {label['conditional']})" if "conditional" in label else ""
        raise ValueError(f"{label['guidance_scale']} != 1 needs a class-conditional U-Net (got {guidance_scale:g}); "
                         f"this U-Net is unconditional, so leave {label['guidance_scale']} at 1{needs}.")


def class_ids_for(class_labels, batch_size: int, num_classes: int, class_names: Optional[Sequence[str]] = None,
                  *, option: str = "class_labels") -> Optional[list[int]]:
    """Class ids for a batch from ints or class names; one value is repeated over the batch.

    Works from the model's class count and names alone, so a command can check a requested class
    before it loads the model. `option` names the argument in messages (e.g. "--class").

    Returns None for an unconditional model given no labels. Raises ValueError naming the known classes.
    """
    names = list(class_names or [])
    known = (', '.join(names) if names else f'(none named; use ids 0..{num_classes - 1})')
    if class_labels is None:
        if num_classes:
            raise ValueError(f"This U-Net is class-conditional: pass {option} (ids 0..{num_classes - 1} or names "
                             f"{', '.join(map(str, names or range(num_classes)))}).")
        return None
    if not num_classes:
        raise ValueError(f"This U-Net is unconditional (no class embedding), so it takes no {option}; leave "
                         f"{option} out.")
    if isinstance(class_labels, (int, str)):
        class_labels = [class_labels] * batch_size
    if len(class_labels) != batch_size:
        raise ValueError(f"Got {len(class_labels)} class labels for a batch of {batch_size} images.")
    ids = []
    for label in class_labels:
        if isinstance(label, str):
            if label not in names:
                raise ValueError(f"Unknown class name {label!r}. Known classes: {known}; pass one of them as {option}.")
            label = names.index(label)
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= int(label) < num_classes:
            raise ValueError(f"Class id {label} is out of range: use 0..{num_classes - 1} ({option}).")
        ids.append(int(label))
    return ids
