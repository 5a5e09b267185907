import sys

import numpy as np
import pytest

from forwardinf.memory import reset_peak, status_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_peak_follows_an_allocation_and_resets_after_it_is_freed():
    block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
    peak_with = status_mb("VmHWM")
    assert peak_with >= status_mb("VmRSS") > 200
    del block
    if not reset_peak():
        pytest.skip("clear_refs not writable here")
    assert status_mb("VmHWM") < peak_with - 150  # the freed block no longer counts


def test_unknown_field_is_nan():
    assert np.isnan(status_mb("NoSuchField"))
