"""Table 6: EPIC's mask ratio (share of each caption's tokens drawn by saliency and replaced)."""
from .common import Variant, downstream_report, pretraining_units

TITLE = "Table 6: mask ratio of EPIC"
RATIOS = (0.15, 0.25, 0.35, 0.45)


def ratio_variant(ratio: float) -> Variant:
    """EPIC at one mask ratio; 0.35 is the default config itself (so it is the same run as Tables 4 and 5's)."""
    return Variant(f"{ratio}", "epic", () if ratio == 0.35 else (f"epic.mask_ratio={ratio}",))


VARIANTS = tuple(ratio_variant(r) for r in RATIOS)


def units(study):
    return pretraining_units(study, VARIANTS)


def report(study):
    table = downstream_report(study, VARIANTS, TITLE, "Mask ratio",
                              ["0.35 is the EPIC config itself (the same runs as Tables 4 and 5)."])
    return table
