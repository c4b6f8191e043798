"""dlc: a deep-learning compiler. `.dln` network files -> typed graph -> native training steps."""
import os as _os

# In the source tree passes/, backends/ and grammar/ sit beside dlc/ (installed, they are
# dlc.passes, dlc.backends, dlc.grammar). Importing dlc straight from a checkout
# (`python -m dlc` in the repository root) finds them through this extra path entry.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "passes")) and _os.path.isfile(
        _os.path.join(_root, "passes", "__init__.py")):
    __path__.append(_root)  # noqa: F821 - a package's __path__

__version__ = "0.1.0"

from dlc.api import Model, load  # noqa: E402
from dlc.core.diagnostics import DlcError, DlcWarning  # noqa: E402
from dlc.runtime.callbacks import Callback, EarlyStopping  # noqa: E402

__all__ = ["load", "Model", "DlcError", "DlcWarning", "Callback", "EarlyStopping", "__version__"]
