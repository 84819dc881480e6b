"""Tests never touch the network: the hub and transformers are put offline before anything imports them."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Calibration statistics are cached per checkpoint: one cache for this test session, never the user's.
if "GEMMA4_EXPORT_CACHE" not in os.environ:
    import tempfile

    os.environ["GEMMA4_EXPORT_CACHE"] = tempfile.mkdtemp(prefix="gemma4-export-test-cache-")
# Exports under 8 bits calibrate by default, and the suite makes many checkpoints (every layout, adapters), each
# calibrated afresh: 2 chunks of 1024 tokens test the same code as the default 16 (thresholds were measured with 16).
os.environ.setdefault("GEMMA4_EXPORT_CALIBRATION_CHUNKS", "2")

import pytest  # noqa: E402

from gemma4_export.exporter.variants import TINY, VARIANTS  # noqa: E402

REAL = [n for n, v in VARIANTS.items() if not v.tiny and not v.instruction_tuned]


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite the golden plan files")


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")


@pytest.fixture(params=TINY)
def tiny(request):
    return request.param
