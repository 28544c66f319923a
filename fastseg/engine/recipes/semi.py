"""The semi-supervised recipe (UniMatch / S4MIM): model, labelled + unlabelled pairs and loss for
``fastseg train MODEL --labelled-fraction F`` and the S4MIM experiment.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...data.semi import SemiSupervisedPairs
from ...data.shapes import ShapesConfig, ShapesDataset
from ...models.unimatch import DeepLabV3PlusSemi
from ...registry import create_model

__all__ = ["build_training", "s4mim_loss"]


def s4mim_loss(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``loss_fn`` for `fastseg.engine.train` over `SemiSupervisedPairs` batches (UniMatch and S4MIM models)."""
    return model.loss(batch)


def build_training(
    model_name: str,
    world: Any = None,
    labelled_fraction: float = 1.0,
    seed: int = 0,
    train_length: int | None = None,
    pairs_length: int = 10**6,
    semi_supervised: bool | None = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, Any, Any]:
    """Model, training set and ``loss_fn`` for training ``model_name`` on the shapes world at ``labelled_fraction``.

    UniMatch / S4MIM models (``semi_supervised`` None or True) get `SemiSupervisedPairs` of the labelled and unlabelled
    subsets and `s4mim_loss`; any other model (or ``semi_supervised=False``: the supervised-only baseline) gets the
    labelled subset alone and ``None`` (its own ``model.loss``).

    Args:
        model_name: a registered model.
        world: a `fastseg.data.shapes.ShapesConfig` (default: the default world).
        labelled_fraction: fraction of the train split that is labelled, in (0, 1].
        seed: seeds the world and the pairing.
        train_length: size of the train split the subsets come from (the shapes default: 4096).
        pairs_length: number of items of the pairs dataset.
        semi_supervised: force the semi-supervised (True) or supervised-only (False) recipe.
        **model_kwargs: passed to `fastseg.create_model`.

    Returns:
        ``(model, train_set, loss_fn)`` for ``fastseg.engine.train(model, train_set, cfg, val_set, loss_fn=loss_fn)``.
    """
    if not 0.0 < labelled_fraction <= 1.0:
        raise ValueError(f"labelled_fraction must lie in (0, 1], got {labelled_fraction!r}")
    world = world or ShapesConfig()
    model = create_model(model_name, num_classes=world.num_classes, **model_kwargs)
    labelled = ShapesDataset(
        "train", length=train_length, config=world, seed=seed, subset="labelled", labelled_fraction=labelled_fraction
    )
    if len(labelled) == 0:
        raise ValueError(
            f"labelled_fraction={labelled_fraction} leaves no labelled image in a train split of "
            f"{train_length or 'default'} samples"
        )
    semi = isinstance(model, DeepLabV3PlusSemi) if semi_supervised is None else semi_supervised
    if not semi:
        return model, labelled, None
    if not isinstance(model, DeepLabV3PlusSemi):
        raise ValueError(f"{model_name} has no semi-supervised loss; use a unimatch_* or s4mim_* model")  # noqa: TRY004
    if labelled_fraction >= 1.0:
        raise ValueError("semi-supervised training needs unlabelled images: labelled_fraction must be < 1")
    unlabelled = ShapesDataset(
        "train", length=train_length, config=world, seed=seed, subset="unlabelled", labelled_fraction=labelled_fraction
    )
    return model, SemiSupervisedPairs(labelled, unlabelled, length=pairs_length, seed=seed), s4mim_loss
