"""Store implementations: SQL (SQLAlchemy) now, MongoDB later."""
