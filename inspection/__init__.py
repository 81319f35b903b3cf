"""inspection: industrial visual inspection of cast parts.

Stages (each callable on its own): ingest -> train -> export -> registry -> runner -> review, plus adapt.
The serving wing (images, runner, decisions, review, registry) never imports torch.
"""

import os

__version__ = "0.1.0"

# Offline by construction: nothing in this project may reach a hub or phone home.
for _key, _value in {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(_key, _value)
