"""Table 4: the ITC task with random corruption, with a language model, and EPIC (saliency masking + LM),
against vanilla METER."""
from .common import UNTRAINED, VANILLA, Variant, downstream_report, pretraining_units

TITLE = "Table 4: ITC (rand.) / ITC + LM / EPIC vs vanilla METER"
VARIANTS = (
    UNTRAINED,  # the floor: fine-tuned from the random init
    VANILLA,
    Variant("ITC (rand.)", "epic", ("epic.corruption=random", "epic.masking=uniform")),
    Variant("ITC + LM", "epic", ("epic.masking=uniform",)),
    Variant("EPIC", "epic", ()),
)


def units(study):
    return pretraining_units(study, VARIANTS)


def report(study):
    return downstream_report(study, VARIANTS, TITLE, "Method")
