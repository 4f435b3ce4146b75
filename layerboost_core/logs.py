"""Logging set-up for every entry point (CLI, Ray workers, scripts): our messages on stderr, third-party
chatter kept quiet."""
from __future__ import annotations

import logging
import sys

NOISY_LOGGERS = ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets", "fsspec", "lm_eval", "lm-eval")


def quiet_libraries() -> None:
    """Keep third-party chatter (download retries, weight-loading bars) out of our output."""
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    quiet_libraries()
