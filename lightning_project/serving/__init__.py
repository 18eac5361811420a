"""The HTTP API: `create_app(predictor, ...)` builds it (plain Python), `serve.py` runs it with Hydra.

    from lightning_project.serving import create_app
    app = create_app(predictor, api_key="s3cret")   # a FastAPI app; run with uvicorn
"""

from lightning_project.serving.app import Settings, check_settings, create_app
from lightning_project.serving.batcher import Busy, MicroBatcher

__all__ = ["Busy", "MicroBatcher", "Settings", "check_settings", "create_app"]
