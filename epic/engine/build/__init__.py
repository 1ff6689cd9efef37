"""Old import path of the run wiring, which is ``epic.wiring`` now (entry points -> wiring -> engine)."""
from epic.wiring import *  # noqa: F401,F403
from epic.wiring import expand_env  # noqa: F401
