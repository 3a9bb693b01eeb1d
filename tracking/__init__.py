"""fmc's tracking layer, the only code that imports ``mlflow``; one job per module:

- ``tracking.store``: where the store is, whether it answers, which errors are worth waiting out;
- ``tracking.delivery``: a trial's calls delivered in order through outages (the outage buffer);
- ``tracking.claims``: which sweep runs a trial (pure decisions over runs) and the heartbeat;
- ``tracking.trial_logger``: one trial's child run, its scores, artifacts and models;
- ``tracking.tracker``: the driver's verbs (experiment, what is finished or claimed, the parent run);
- ``tracking.pyfunc_model``: the model served from a run; ``tracking.server``: the deployment's server.
"""

from tracking.store import TrackingError, TrackingOutage, TrackingRefused, check_server, resolve_uri, serve_ui  # noqa: F401
from tracking.tracker import Tracker  # noqa: F401
from tracking.trial_logger import RunContext, TrialLogger  # noqa: F401
