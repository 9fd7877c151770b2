"""Names for the array containers the app passes around."""

from __future__ import annotations

import numpy as np

# A model (or an update, or a strategy's state) as arrays by state-dict key. (Flower's
# own ``NDArrays`` is a list: here a list is called ``ArrayList``.)
ArrayDict = dict[str, np.ndarray]
ArrayList = list[np.ndarray]
