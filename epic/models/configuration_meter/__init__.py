"""Old import path of METER's config; it lives in ``epic.models.meter.configuration_meter``."""
from epic.models.meter.configuration_meter import METERConfig  # noqa: F401
