"""Table 8 (App. J): †CMLM, saliency-based masking for the CMLM objective of vanilla METER."""
from .common import VANILLA, Variant, downstream_report, pretraining_units

TITLE = "Table 8: †CMLM (saliency masking for CMLM) in vanilla METER"
VARIANTS = (
    VANILLA,
    Variant("METER + †CMLM", "vanilla", ("data.mlm_masking=saliency",)),  # teacher: the vanilla run of its seed
    Variant("EPIC", "epic", ()),
)


def units(study):
    return pretraining_units(study, VARIANTS)


def report(study):
    return downstream_report(study, VARIANTS, TITLE, "Method",
                             ["†CMLM: vanilla METER whose MLM positions are drawn from the teacher's saliency "
                              "(data.mlm_masking=saliency, epic.teacher = the vanilla run of the same seed)."])
