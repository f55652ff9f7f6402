"""chatlearn's logger: one named logger, one format, INFO by default."""
from __future__ import annotations

import logging
import os

_FORMAT = "[chatlearn %(asctime)s %(levelname)s] %(message)s"


def get_logger(name: str = "chatlearn") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logging.getLogger("chatlearn").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root = logging.getLogger("chatlearn")
        root.addHandler(handler)
        root.setLevel(os.environ.get("CHATLEARN_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logger
