"""The SDK under its first name: `from pageserver.sdk import Strata` keeps
working. It lives in `pageserver.clients.sdk`."""

from pageserver.clients.sdk import *  # noqa: F403
from pageserver.clients.sdk import Branch, Database, Strata  # noqa: F401
