"""Error measures shared by the tests, the demo and the benchmarks."""

import numpy as np


def rel_rms(actual, expected) -> float:
    """Relative RMS error ||actual - expected|| / ||expected|| (the bare RMS error when expected is all zero)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    denom = np.sqrt(np.mean(expected**2))
    err = np.sqrt(np.mean((actual - expected) ** 2))
    return float(err / denom) if denom > 0 else float(err)
