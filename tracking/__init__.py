"""fmc's tracking layer: the MLflow adapter (``tracking.mlflow_adapter``), the model served from a run
(``tracking.pyfunc_model``) and the deployment's server launcher (``tracking.server``). The rest of fmc
imports these names from here and never imports ``mlflow``."""

from tracking.mlflow_adapter import (  # noqa: F401
    RunContext,
    Tracker,
    TrackingError,
    TrackingOutage,
    TrialLogger,
    check_server,
    resolve_uri,
    serve_ui,
)
