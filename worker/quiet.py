"""No library progress bars (nor libraries' notices about each other) in a worker's log.

transformers ("Loading weights", "Loading checkpoint shards") and huggingface_hub ("Fetching files", downloads)
draw tqdm bars on stderr. A worker's stderr is a log, not a terminal: Celery logs whatever reaches it as a
WARNING, so every job's load would read as a warning. A job says what it loads through its own events
("loading model ...", "model loaded in ..."); the bars go. huggingface_hub's switch (an environment variable,
read when it is imported) covers both libraries (transformers asks it at its own import); the functions cover
a library imported before this ran.
"""

from __future__ import annotations

import os
import sys
import warnings

# Deprecation notices a library raises at another on every job, which no user of this service can act on
# (Python prints a warning to stderr, which Celery logs as a WARNING).
_LIBRARY_NOISE = [
    # transformers 5 renamed it; peft 0.21 still reads the old name when it wraps a model.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
]


def disable_progress_bars() -> None:
    """Switch the libraries' progress bars off, in this process and in the processes it starts, and their
    deprecation notices about each other (`_LIBRARY_NOISE`)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for message, category in _LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars as hub_off

        hub_off()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
