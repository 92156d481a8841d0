"""Where data and built models live: environment variables and the user cache, never the checkout.

* ``$TL_TENSORLENS_DATA``: a folder with ``relations/`` (LRE JSON) and ``text/`` (sentence polarity,
  WikiText-2 raw); every loader also takes an explicit path.
* ``$TL_TENSORLENS_CACHE``: where subjects are built (default ``$XDG_CACHE_HOME/tl_tensorlens`` or
  ``~/.cache/tl_tensorlens``).
"""

import os
from pathlib import Path

from tl_tensorlens.errors import DataError

DATA_ENV = "TL_TENSORLENS_DATA"
CACHE_ENV = "TL_TENSORLENS_CACHE"


def data_dir() -> Path:
    """The data folder named by ``$TL_TENSORLENS_DATA``.

    Raises:
        DataError: the variable is unset or names no folder (the message says what to do).
    """
    env = os.environ.get(DATA_ENV)
    if not env:
        raise DataError(
            f"no data folder: set {DATA_ENV} to the folder holding relations/ and text/ "
            "(in a source checkout: ../shared/data), or pass the file or folder explicitly"
        )
    path = Path(env).expanduser()
    if not path.is_dir():
        raise DataError(f"{DATA_ENV}={env!r} is not a folder")
    return path


def cache_dir() -> Path:
    """The cache root: ``$TL_TENSORLENS_CACHE``, else ``$XDG_CACHE_HOME/tl_tensorlens``, else
    ``~/.cache/tl_tensorlens`` (not created here).

    Example:
        >>> cache_dir().name
        'tl_tensorlens'
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tl_tensorlens"
