"""Every comparison fastseg reports, declared once. ``python -m fastseg.experiments list`` prints them.

The budget: ``fpn_convergence`` trains the supervised baseline for 1500 steps x 16 images with a validation point
every 100 steps. Its curve (README) rises by 25 points over the first 600 steps and by 0.5 point over the last 300
(0.7993, 0.8044, 0.8027 at steps 1300-1500), so the comparisons use that budget, :data:`SHAPES_BUDGET` (AdamW 1e-3,
50 warm-up steps, poly decay, clip 1.0, 256 validation images), every variant alike, 3 seeds. Semi-supervised
comparisons count a step as ``batch_size`` labelled plus as many unlabelled images; each of their steps costs several
encoder passes, so they run 1000 steps of 8 + 8 images.
"""

from __future__ import annotations

from .core import Budget, Claim, Experiment, Variant

SHAPES_BUDGET = Budget(
    steps=1500,
    batch_size=16,
    lr=1e-3,
    weight_decay=1e-4,
    warmup_steps=50,
    grad_clip=1.0,
    val_length=256,
    eval_every=100,
)
SEMI_BUDGET = Budget(
    steps=1000, batch_size=8, lr=1e-3, weight_decay=1e-4, warmup_steps=50, grad_clip=1.0, val_length=256, eval_every=100
)

FPN_CONVERGENCE = Experiment(
    name="fpn_convergence",
    title="Supervised baseline, validation mIoU vs steps (the curve that sets the comparison budget)",
    variants=(Variant("fpn_resnet18", "fpn_resnet18", label="`fpn_resnet18`"),),
    budget=SHAPES_BUDGET,
    seeds=(0,),
)

ECENET_VS_FPN = Experiment(
    name="ecenet_vs_fpn",
    title="ECENet vs the semantic FPN, ResNet-18 from scratch",
    variants=(
        Variant("fpn_resnet18", "fpn_resnet18", label="`fpn_resnet18`"),
        Variant("ecenet_resnet18", "ecenet_resnet18", label="`ecenet_resnet18`"),
        Variant(
            "ecenet_resnet18_no_class_embeddings",
            "ecenet_resnet18",
            {"class_embeddings": False},
            label="`ecenet_resnet18`, no class-embedding path (ablation)",
        ),
    ),
    budget=SHAPES_BUDGET,
    claims=(
        Claim("ECENet is no more than 1 point below the FPN baseline", "ecenet_resnet18", "fpn_resnet18", -0.01),
        Claim("the class-embedding path helps ECENet", "ecenet_resnet18", "ecenet_resnet18_no_class_embeddings"),
    ),
)


def _s4mim(fraction: float, tag: str) -> Experiment:
    semi = {"labelled_fraction": fraction}
    return Experiment(
        name=f"s4mim_{tag}",
        title=f"S4MIM vs UniMatch vs supervised-only, labelled fraction {tag.replace('_', '/')}",
        variants=(
            Variant(
                "supervised",
                "unimatch_resnet18",
                recipe="semi",
                recipe_kwargs={**semi, "semi": False},
                label="supervised only (same DeepLabV3+, labelled subset)",
            ),
            Variant("unimatch", "unimatch_resnet18", recipe="semi", recipe_kwargs=semi, label="UniMatch base"),
            Variant("s4mim", "s4mim_resnet18", recipe="semi", recipe_kwargs=semi, label="S4MIM (class-wise MIM)"),
            Variant(
                "s4mim_plain_mim",
                "s4mim_resnet18",
                {"mim": "plain"},
                recipe="semi",
                recipe_kwargs=semi,
                label="S4MIM with plain image-level MIM (ablation)",
            ),
            Variant(
                "s4mim_cap3",
                "s4mim_resnet18",
                {"max_classes_per_image": 3, "mim_budget": None},
                recipe="semi",
                recipe_kwargs=semi,
                label="S4MIM with at most 3 classes per image (ablation)",
            ),
        ),
        budget=SEMI_BUDGET,
        claims=(
            Claim("S4MIM beats its UniMatch base", "s4mim", "unimatch"),
            Claim("UniMatch beats supervised-only training", "unimatch", "supervised"),
            Claim("class-wise MIM beats plain MIM", "s4mim", "s4mim_plain_mim"),
            Claim("MIM over every present class beats the 3-class cap", "s4mim", "s4mim_cap3"),
        ),
    )


S4MIM_1_8 = _s4mim(0.125, "1_8")
S4MIM_1_16 = _s4mim(0.0625, "1_16")

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (FPN_CONVERGENCE, ECENET_VS_FPN, S4MIM_1_8, S4MIM_1_16)}
