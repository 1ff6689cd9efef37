"""Table 5: where the inconsistent tokens come from (the generator), EPIC with saliency masking throughout."""
from .common import Variant, downstream_report, pretraining_units

TITLE = "Table 5: generators of inconsistent tokens"
VARIANTS = (
    Variant("LM (cond.)", "epic", ("epic.generator_mode=conditioned",)),
    Variant("VLM (SAS)", "epic", ("epic.generator_mode=vlm_sas",)),
    Variant("LM (trained)", "epic", ("epic.generator_mode=pretrained_fixed",)),
    Variant("LM (fixed)", "epic", ("epic.generator_mode=fixed",)),
    Variant("LM (fine-tune)", "epic", ()),  # the EPIC default (epic.generator_mode=finetune)
)
NOTES = ("LM (trained): the generator is fitted first on the pretraining captions, text only, with "
         "tools/fit_generator.py (half the pretraining steps), then frozen (epic.generator_mode=pretrained_fixed). "
         "LM (fixed): a random-init (tiny) / base (ablation) LM, frozen. LM (fine-tune): EPIC's default.",)


def units(study):
    return pretraining_units(study, VARIANTS)


def report(study):
    return downstream_report(study, VARIANTS, TITLE, "Generator", NOTES)
