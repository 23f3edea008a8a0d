"""Third-party noise off during export: Python warnings (TracerWarning, the TorchScript
exporter's DeprecationWarning, transformers' FutureWarnings) and transformers/huggingface_hub
progress bars. `jaonnx export --verbose` leaves them on."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_third_party(verbose: bool = False) -> Iterator[None]:
    if verbose:
        yield
        return
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as tf_logging

    verbosity = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    hub_bars = not hub_utils.are_progress_bars_disabled()
    loggers = {name: logging.getLogger(name).level for name in ("torch.onnx", "onnxscript", "onnx_ir")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            tf_logging.set_verbosity(verbosity)
            if bars:
                tf_logging.enable_progress_bar()
            if hub_bars:
                hub_utils.enable_progress_bars()
            for name, level in loggers.items():
                logging.getLogger(name).setLevel(level)
