"""Store implementations: SQL (SQLAlchemy) and MongoDB (pymongo).

Which kind a URL or object names is told here, without importing pymongo: a
command on a SQL store never pays for loading the MongoDB driver.
"""

from __future__ import annotations

from typing import Any, TypeGuard


def is_mongo_url(url: Any) -> TypeGuard[str]:
    """Tell whether ``url`` names a MongoDB store (``mongodb://``, ``mongodb+srv://``, mock)."""
    return isinstance(url, str) and url.startswith(("mongodb://", "mongodb+srv://",
                                                    "mongomock://"))


def is_database(obj: Any) -> bool:
    """Tell whether ``obj`` is a pymongo (or mongomock) ``Database``."""
    return hasattr(obj, "list_collection_names") and hasattr(obj, "get_collection") \
        and hasattr(obj, "client")
