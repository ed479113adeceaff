"""Third-party noise silenced at its source, and only that."""

from __future__ import annotations


def test_deepspeeds_accelerator_guess_is_dropped_and_its_other_messages_kept():
    import logging

    from iterppo_lightning.utils.third_party import quiet_deepspeed_accelerator_detection

    quiet_deepspeed_accelerator_detection()
    quiet_deepspeed_accelerator_detection()  # idempotent
    logger = logging.getLogger("DeepSpeed")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("ZeRO stage 3 needs more memory")
    finally:
        logger.removeHandler(handler)
    assert seen == ["ZeRO stage 3 needs more memory"]
