"""Old import path of the weight loader, which is ``epic.models.loading`` now."""
from epic.models.loading import *  # noqa: F401,F403
