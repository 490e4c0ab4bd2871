"""The online predictor (KServe custom model). Import order matters: see below."""

import sys

# KServe parses sys.argv when ``kserve.model_server`` is imported (its module-level argparse), so
# `recsys serve --help` or any of our flags would be read as KServe's. Import it once with no arguments;
# ``predictor.serving.server`` passes every setting to ModelServer explicitly instead.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve  # noqa: F401
finally:
    sys.argv = _argv
