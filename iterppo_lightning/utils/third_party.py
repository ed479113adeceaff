"""Third-party console noise that says nothing to a user of this package, silenced at its source.

transformers' `save_pretrained` imports DeepSpeed whenever it is installed (accelerate's `unwrap_model` checks
for a DeepSpeedEngine), and DeepSpeed, on its first look for an accelerator, logs "Setting accelerator to CPU. If
you have GPU or other accelerator, we were unable to detect it." on every command that saves a model, DeepSpeed in
use or not. The Trainer's `accelerator` setting is what decides the device here; a filter on DeepSpeed's logger
drops that one line and nothing else (DeepSpeed's own warnings, under a DeepSpeed strategy, still show).
"""

from __future__ import annotations

import logging

DEEPSPEED_LOGGER = "DeepSpeed"
ACCELERATOR_GUESS = "Setting accelerator to CPU"


class _DropAcceleratorGuess(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(ACCELERATOR_GUESS)


def quiet_deepspeed_accelerator_detection() -> None:
    """Drop DeepSpeed's accelerator auto-detection warning (DeepSpeed need not be imported yet: its logger, made
    by name when it is, keeps the filter)."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _DropAcceleratorGuess) for f in logger.filters):
        logger.addFilter(_DropAcceleratorGuess())
